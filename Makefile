# Two commands do all the set-up on a fresh machine:
#   make demo   install redline into .venv, run a short sr3-tiny training and write its
#               report (runs/sr3-tiny-TIME/report.html)
#   make test   install redline with its test tools into .venv and run the tests
#
# TORCH is what pip installs first. The default pins the CPU build this project's
# machines carry; on a GPU machine pass your own, e.g. `make demo TORCH=torch==2.13.0`
# from an index with CUDA wheels, or install torch into .venv beforehand (an installed
# torch that satisfies redline's range is kept as it is).
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

test-fast: $(VENV)/.installed    # the quick loop: unit tests only, no CLI runs (~20 s)
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
