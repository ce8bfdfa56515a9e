# Two commands do all the set-up on a fresh machine:
#   make demo   install redline (with the extras and the test tools) into .venv, check the
#               environment (redline doctor), train sr3-tiny for 200 steps and write its
#               report (runs/sr3-tiny-TIME/report.html)
#   make test   the same install, then the whole test suite
#
# TORCH is what pip installs first, before redline (whose range, torch>=2.4, an installed
# torch then satisfies). What `torch==2.13.0` resolves to depends on the index: this
# project's machines carry the CPU wheel; PyPI on Linux serves the CUDA build. To choose,
# pass your own (`make demo TORCH=...`) or install torch into .venv beforehand: an
# installed torch is kept as it is.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test test-fast lint install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/redline doctor
	$(VENV)/bin/redline train sr3-tiny --steps 200 --set train.eval_every=100 \
		--set telemetry.log_every=20 --set inspect.every=50

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed    # the quick loop: tests not marked slow, no CLI runs (under a minute)
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
