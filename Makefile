# `make test` and `make demo` do all the set-up on a fresh machine: a virtualenv in .venv with
# kd_jax and its test extras. torch is installed first and pinned (CPU build, parity tests only)
# so that no dependency pulls a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

demo: install
	@echo "make demo: the offline end-to-end distillation demo (traces -> teacher -> precompute ->"
	@echo "three students -> evaluation table) is not built yet; see README.md, 'Status'."
	@exit 1

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
