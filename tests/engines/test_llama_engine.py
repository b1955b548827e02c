"""A real llama.cpp engine serving a tiny generated model, driven by the official openai client."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.engines.fixtures import NOT_INSTALLED, require_engine
from tests.engines.llama_server import LlamaServer, find_llama_server
from tests.engines.tiny_gguf import build_vocab, write_tiny_llama

pytest_plugins = ("tests.engines.fixtures",)

MODEL = "tiny-llama"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a tiny random model."},
    {"role": "user", "content": "Say something, anything."},
]


def _client(engine: LlamaServer) -> OpenAI:
    return OpenAI(base_url=engine.base_url, api_key="sk-test", max_retries=0, timeout=60)


def _aclient(engine: LlamaServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=engine.base_url, api_key="sk-test", max_retries=0, timeout=60)


def _report(request: pytest.FixtureRequest, name: str, seconds: float) -> None:
    """Record a timing (shown with -rP / -s, and in user_properties; record_property would warn
    under --junitxml's default xunit2 family, an error with filterwarnings=error)."""
    request.node.user_properties.append((name, round(seconds, 4)))
    print(f"{name} = {seconds:.4f}")


# -- no engine needed ------------------------------------------------------------------------------


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=3)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=3)
    c = write_tiny_llama(tmp_path / "c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 1_000_000


def test_tiny_vocab_layout() -> None:
    tokens, types, allowed = build_vocab()
    assert len(tokens) == len(set(tokens)) == len(types) == len(allowed)
    assert tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(t == 5 for t in types[0x80:0x100])  # UNUSED: not valid UTF-8 alone
    assert not any(allowed[0x80:0x100]) and not any(allowed[-3:])


# -- real engine ---------------------------------------------------------------------------------------


@pytest.mark.engine
def test_server_health_and_models(llama_engine: LlamaServer, request: pytest.FixtureRequest) -> None:
    assert llama_engine.is_running()
    assert llama_engine.startup_seconds is not None
    _report(request, "startup_seconds", llama_engine.startup_seconds)
    with urllib.request.urlopen(f"{llama_engine.url}/health", timeout=5) as resp:
        assert resp.status == 200
    with _client(llama_engine) as client:
        ids = [m.id for m in client.models.list()]
    assert MODEL in ids


@pytest.mark.engine
def test_chat_completion_well_formed(llama_engine: LlamaServer) -> None:
    with _client(llama_engine) as client:
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
        again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.id and resp.created > 0 and resp.model
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.content.isascii()
    assert choice.finish_reason == "length"  # the tiny model never emits EOS
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 16
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


@pytest.mark.engine
def test_chat_completion_streaming(llama_engine: LlamaServer) -> None:
    with _client(llama_engine) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stream=True
        )
        with stream:
            chunks = list(stream)
    assert len(chunks) >= 5
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]


@pytest.mark.engine
async def test_concurrent_streams(llama_engine: LlamaServer) -> None:
    n_streams, max_tokens = 8, 24

    async def one(client: AsyncOpenAI, i: int) -> tuple[int, str | None, str]:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"stream number {i}"}]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.8,
            seed=i,
            stream=True,
        )
        n_chunks, finish, text = 0, None, []
        async with stream:
            async for chunk in stream:
                n_chunks += 1
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
        return n_chunks, finish, "".join(text)

    async with _aclient(llama_engine) as client:
        results = await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n_streams))), 120)
    assert len(results) == n_streams
    for n_chunks, finish, text in results:
        assert finish == "length"
        assert n_chunks >= 5
        assert text


@pytest.mark.engine
def test_generation_time_32_tokens(llama_engine: LlamaServer, request: pytest.FixtureRequest) -> None:
    with _client(llama_engine) as client:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)  # warm the slot
        began = time.perf_counter()
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=32, temperature=0
        )
        elapsed = time.perf_counter() - began
    assert resp.usage is not None and resp.usage.completion_tokens == 32
    _report(request, "seconds_for_32_tokens", elapsed)
    assert elapsed < 30  # generous: typically well under a second on CPU


@pytest.mark.engine
def test_server_stop_and_context_manager(tiny_model_path: Path, tmp_path: Path) -> None:
    if find_llama_server() is None:
        require_engine(NOT_INSTALLED)
    server = LlamaServer(tiny_model_path, alias="other", n_parallel=1, log_path=tmp_path / "srv.log")
    with server as srv:
        assert srv.is_running() and srv.url.startswith("http://127.0.0.1:")
        pid = srv.pid
    assert pid is not None and not server.is_running()
    assert "llama" in (tmp_path / "srv.log").read_text(errors="replace").lower()
