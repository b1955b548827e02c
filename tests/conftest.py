"""Shared fixtures: fake backends, a gateway factory, and the real llama.cpp engine."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

pytest_plugins = ["tests.engines.fixtures"]

GatewayFactory = Callable[[dict[str, Any]], ThreadGateway]


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's gateways keep their state (keys, usage) in a fresh data directory, never the user's."""
    monkeypatch.setenv("SYNAPSE_DATA_DIR", str(tmp_path_factory.mktemp("synapse-data")))


@pytest.fixture
def vllm() -> Iterator[FakeVLLM]:
    with FakeVLLM(["llama-3.2-8b"]) as fake:
        yield fake


@pytest.fixture
def vllm2() -> Iterator[FakeVLLM]:
    with FakeVLLM(["llama-3.2-8b"], reply="second replica says hi") as fake:
        yield fake


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(["llama3.1:8b", "qwen2.5:7b"], embedding_models=["nomic-embed-text"]) as fake:
        yield fake


@pytest.fixture
def start_gateway() -> Iterator[GatewayFactory]:
    """Start gateways from config dicts; all are stopped at the end of the test."""
    started: list[ThreadGateway] = []

    def start(config: dict[str, Any]) -> ThreadGateway:
        gateway = ThreadGateway(config).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


_HELD_PORTS: list[socket.socket] = []


def dead_url() -> str:
    """An address where connections are refused at once: a port held bound (so nobody else takes it)
    but never listening, for the rest of the test session."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"



@pytest.fixture(scope="session", autouse=True)
def _release_held_ports() -> Iterator[None]:
    yield
    while _HELD_PORTS:
        _HELD_PORTS.pop().close()
