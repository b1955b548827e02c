"""SSE passes through chunk by chunk, reports usage, survives 200 concurrent streams, and stops on disconnect."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.vllm import FakeVLLM

MESSAGES = [{"role": "user", "content": "Hello"}]


def _config(*fakes: FakeVLLM) -> dict[str, object]:
    return {"backends": {f"v{i}": {"url": f.url} for i, f in enumerate(fakes)}}


def test_stream_with_usage(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(_config(vllm))
    with gw.client() as client:
        stream = client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "fake reply from llama-3.2-8b"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    record = gw.access_lines()[-1]
    assert record["tokens_out"] == chunks[-1].usage.completion_tokens
    assert record["tokens_in"] == chunks[-1].usage.prompt_tokens
    assert record["stream"] is True and record["ttft_ms"] is not None


def test_chunks_are_relayed_as_they_arrive(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["slow"], stream_chunks=4, chunk_delay=0.4) as slow:
        gw = start_gateway(_config(slow))
        with gw.client() as client:
            stream = client.chat.completions.create(model="slow", messages=MESSAGES, stream=True)
            arrivals = [time.monotonic() for _ in stream]
    assert arrivals[-1] - arrivals[0] >= 1.0, "the first chunk arrived only when the stream had ended"


def test_client_disconnect_closes_the_upstream_within_a_second(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["slow"], stream_chunks=200, chunk_delay=0.1) as slow:
        gw = start_gateway(_config(slow))
        with httpx.Client(base_url=gw.url, timeout=10) as http, http.stream(
                "POST", "/v1/chat/completions", json={"model": "slow", "messages": MESSAGES, "stream": True}
        ) as answer:
            next(answer.iter_bytes())
        closed_at = time.monotonic()
        slow.wait_until(lambda: slow.disconnects == 1 and slow.in_flight == 0, timeout=1.0)
        assert time.monotonic() - closed_at <= 1.0
        gw_backend = gw.gateway.backends["v0"]
        slow.wait_until(lambda: gw_backend.in_flight == 0, timeout=1.0)


def test_client_disconnect_while_waiting_for_the_first_byte(start_gateway: GatewayFactory,
                                                            vllm: FakeVLLM) -> None:
    vllm.hang = True
    gw = start_gateway(_config(vllm))
    with httpx.Client(base_url=gw.url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES, "stream": True})
    vllm.wait_until(lambda: vllm.in_flight == 0, timeout=1.0)


async def test_200_concurrent_streams_arrive_intact(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["llama-3.2-8b"], stream_chunks=20, chunk_delay=0.01,
                  reply="stream {model} with twenty pieces of text in it, one by one, all in order") as fake:
        gw = start_gateway(_config(fake))
        async with gw.async_client() as client:
            async def one(i: int) -> str:
                stream = await client.chat.completions.create(
                    model="llama-3.2-8b", messages=[{"role": "user", "content": f"n{i}"}], stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            texts = await asyncio.gather(*(one(i) for i in range(200)))
        assert fake.max_in_flight > 50, "the streams really ran concurrently"
    expected = "stream llama-3.2-8b with twenty pieces of text in it, one by one, all in order"
    assert texts == [expected] * 200


async def test_async_client_non_streaming(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(_config(vllm))
    async with gw.async_client() as client:
        completion = await client.completions.create(model="llama-3.2-8b", prompt="Say hi", max_tokens=5)
    assert completion.choices[0].text


def test_stream_idle_timeout_ends_with_an_error_event(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["slow"], stream_chunks=3, chunk_delay=2.0) as slow:
        gw = start_gateway({"backends": {"v": {"url": slow.url, "timeouts": {"stream_idle": 0.5}}}})
        with gw.http() as http:
            answer = http.post("/v1/chat/completions",
                               json={"model": "slow", "messages": MESSAGES, "stream": True})
    assert answer.status_code == 200
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[-1].startswith('data: {"error":')
    assert "backend_timeout" in events[-1]
