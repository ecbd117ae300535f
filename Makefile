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

DEMO_ARGS ?=

demo: $(VENV)/.installed
	$(PY) demo.py $(DEMO_ARGS)

TEST_WORKERS ?= 2

# The suite runs on TEST_WORKERS pytest-xdist workers, except the memory-heavy parity tests
# (giant models in two frameworks), which run one at a time afterwards.
test: $(VENV)/.test-installed
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not heavy"
	$(PY) -m pytest -q -p no:cacheprovider -m heavy

bench: $(VENV)/.test-installed
	$(PY) bench/da3_forward.py
	$(PY) bench/da3_profile.py
	$(PY) bench/train_step.py
	$(PY) bench/da3_views.py --preset da3-tiny --res 140x210 --views 2,4,8,16,32

clean:
	rm -rf $(VENV) outputs runs/demo .pytest_cache
