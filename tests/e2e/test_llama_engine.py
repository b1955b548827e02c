"""A real llama.cpp engine (a tiny random-weight model made at test time) behind the gateway."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import GatewayFactory
from tests.engines.llama_server import LlamaServer

pytestmark = pytest.mark.engine


def _config(engine: LlamaServer) -> dict[str, object]:
    return {
        "backends": {"llama": {"url": engine.url, "protocol": "openai", "discover": True}},
        "routes": [{"model": "assistant", "aliases": ["gpt-4o-mini"], "backend": "llama",
                    "upstream": "tiny-llama"}],
    }


def test_chat_through_the_gateway(start_gateway: GatewayFactory, llama_engine: LlamaServer) -> None:
    gw = start_gateway(_config(llama_engine))
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    completion = raw.parse()
    assert raw.headers["x-synapse-backend"] == "llama"
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_discovered_engine_model_streams(start_gateway: GatewayFactory, llama_engine: LlamaServer) -> None:
    gw = start_gateway(_config(llama_engine))
    with gw.client() as client:
        stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=12, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in {"stop", "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2


async def test_concurrent_streams_on_a_real_engine(start_gateway: GatewayFactory,
                                                   llama_engine: LlamaServer) -> None:
    gw = start_gateway(_config(llama_engine))
    async with gw.async_client() as client:
        async def one(i: int) -> str | None:
            stream = await client.completions.create(model="assistant", prompt=f"Count {i}", max_tokens=8,
                                                     stream=True)
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
            return reasons[-1]

        reasons = await asyncio.gather(*(one(i) for i in range(8)))
    assert all(r in {"stop", "length"} for r in reasons)
