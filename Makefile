# Two entry points (see README): `make demo` and `make test`. Each creates ./.venv once (idempotent: redone only
# when requirements-dev.txt, pyproject.toml or setup.py change) and installs the pinned development environment into
# it, then this package in editable mode (built with the venv's setuptools, which pyproject.toml needs to be >= 77).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-quick bench docs clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: train a small Mask R-CNN on the built-in synthetic set and evaluate it (CPU, a few minutes).
demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# The quick local loop: everything but the tests marked slow.
test-quick: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/ops.py

docs: $(STAMP)
	$(PY) -m maskrcnn.config.docs > docs/config.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
