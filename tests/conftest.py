"""Shared fixtures: fake backends, a gateway factory, and the real llama.cpp engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

pytest_plugins = ["tests.engines.fixtures"]

GatewayFactory = Callable[[dict[str, Any]], ThreadGateway]


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


def dead_url() -> str:
    """An address where nothing listens: connections are refused at once."""
    from tests.gateway_harness import free_port

    return f"http://127.0.0.1:{free_port()}"

