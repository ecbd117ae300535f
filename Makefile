# Two commands: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The official DA3 reference package is installed without its (GPU-heavy) dependencies.
DA3_REF := depth-anything-3==0.1.1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[test,video]"
	$(PIP) install -q --no-deps $(DA3_REF)
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.test-installed
	$(PY) bench/da3_forward.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
