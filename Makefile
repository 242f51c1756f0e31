# One command to set up and serve (make demo), one to set up and test (make test).
# Everything installs into .venv at the repository root.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.razor-installed
PORT ?= 8000
# vLLM's CPU backend sizes its KV cache from one NUMA node's memory and refuses its default
# utilisation on small nodes; an explicit KV size avoids that (GiB).
KV_GIB ?= 2

.PHONY: setup demo serve test test-fast clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml scripts/setup_env.sh
	PYTHON=$(PYTHON) bash scripts/setup_env.sh
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py --port $(PORT) --kv-gib $(KV_GIB)

serve: setup
	$(VENV)/bin/razor-vllm model prepare
	VLLM_CPU_KVCACHE_SPACE=$(KV_GIB) $(VENV)/bin/vllm serve $$($(VENV)/bin/razor-vllm model path) \
		--attention-backend razor --port $(PORT) --max-model-len 8192 --dtype float32 --max-num-batched-tokens 512

# --durations: the slowest tests in CI's output. test-fast starts no engine (tests/conftest.py checks the marker).
# Two workers (pytest-xdist), one test module each at a time; tests/conftest.py gives each its own core.
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -rs -n $(PYTEST_WORKERS) --dist loadscope --durations=25 tests

test-fast: setup
	$(PY) -m pytest -q -rs -n $(PYTEST_WORKERS) --dist loadscope --durations=10 -m "not engine" tests

# Locust load test: razor then stock on 127.0.0.1, side-by-side table (loadtest/README.md).
# Options through ARGS, e.g. make loadtest ARGS="--users 16 --run-time 3m".
.PHONY: loadtest
loadtest: setup
	$(PY) -m loadtest $(ARGS)

# The GPU check kit (.gpukit, ignored): vLLM's Triton attention files from the installed package under an
# import shim, plus the profiler's wheels; carry it to a CUDA machine and run scripts/gpu_check.sh there.
.PHONY: gpu-kit gpu-check-dry
gpu-kit: setup
	$(PY) scripts/gpu_kit.py

gpu-check-dry: gpu-kit
	GPU_CHECK_PYTHON=$(PY) scripts/gpu_check.sh --dry

clean:
	rm -rf $(VENV) build *.egg-info razor_vllm/_C*.so .gpukit
