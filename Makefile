# Two commands: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The official DA3 reference package is installed without its (GPU-heavy) dependencies.
DA3_REF := depth-anything-3==0.1.1

.PHONY: demo test bench clean browser

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

# `make demo` is DA3's demo in runs/demo; `make demo-<family>` any registered family's, in
# runs/demo-<family> (e.g. make demo-da3).
demo: $(VENV)/.installed
	$(PY) demo.py --family da3 --workdir runs/demo $(DEMO_ARGS)

demo-%: $(VENV)/.installed
	$(PY) demo.py --family $* $(DEMO_ARGS)

# tests/test_viewer.py opens the predict viewer in headless Chromium (Debian package).
browser:
	@[ "$${GEOJAX_SKIP_BROWSER:-}" = 1 ] || command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "chromium is missing: install it (apt-get install chromium) or set GEOJAX_SKIP_BROWSER=1" >&2; exit 1; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

TEST_WORKERS ?= 2

# The suite runs on TEST_WORKERS pytest-xdist workers, except the memory-heavy parity tests
# (giant models in two frameworks), which run one at a time afterwards.
test: $(VENV)/.test-installed browser
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not heavy"
	$(PY) -m pytest -q -p no:cacheprovider -m heavy

bench: $(VENV)/.test-installed
	$(PY) bench/da3_forward.py
	$(PY) bench/da3_profile.py
	$(PY) bench/train_step.py
	$(PY) bench/da3_views.py --preset da3-tiny --res 140x210 --views 2,4,8,16,32
	$(PY) bench/attention.py
	$(PY) bench/dage.py --preset dage-tiny --pi3-preset pi3-tiny --frames 2,4,8,16 --res 140x252
	$(PY) bench/urgt.py --preset urgt-tiny --attn chunked --res 1080x1920,2160x3840,4320x7680
	$(PY) bench/ppd.py --preset ppd-tiny --res 256x320,512x640,768x1024 --steps 1,4,10 --cascade

clean:
	rm -rf $(VENV) outputs runs/demo runs/demo-* .pytest_cache
