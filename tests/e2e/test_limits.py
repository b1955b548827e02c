"""A key's limits under concurrency, through the gateway: budgets, parallel requests, tokens per minute."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import GatewayFactory
from tests.e2e.test_keys import ADMIN, keyed, new_key
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

MESSAGES = [{"role": "user", "content": "Hi"}]


async def _concurrent(gw: ThreadGateway, key: str, count: int, **request: Any) -> list[int]:
    """Send `count` chat requests at once; the status of each."""
    async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        body = {"model": "llama-3.2-8b", "messages": MESSAGES, **request}
        answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(count)))
    return [a.status_code for a in answers]


def _info(gw: ThreadGateway, key: str) -> dict[str, Any]:
    with gw.http() as http:
        info: dict[str, Any] = http.get("/key/info", params={"key": key}, headers=ADMIN).json()["info"]
    return info


def test_fifty_concurrent_requests_against_a_budget_for_one_let_one_through(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["llama-3.2-8b"], chunk_delay=0.05, stream_chunks=8) as slow:
        gw = start_gateway(keyed({"v": {"url": slow.url}}))
        # One request reserves its prompt (~20 tokens) plus max_tokens 50: a budget of 100 fits one, not two.
        key = new_key(gw, token_budget=100, budget_duration="1d")
        statuses = asyncio.run(_concurrent(gw, key, 50, max_tokens=50, stream=True))
    assert statuses.count(200) == 1, statuses
    assert statuses.count(429) == 49
    assert sum(1 for r in slow.requests if r.path == "/v1/chat/completions") == 1


def test_a_spent_budget_answers_429_with_its_reset(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}, auth={
        "mode": "required", "master_key": "sk-master-test-1234",
        "prices": {"llama-*": {"input": 1000000, "output": 1000000}}}))  # a dollar a token
    key = new_key(gw, max_budget=60, budget_duration="1d")
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as http:
        body = {"model": "llama-3.2-8b", "messages": MESSAGES, "max_tokens": 5}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        spent = _info(gw, key)
        assert spent["spend"] == spent["spend_tokens"] > 0, "settled to the real usage, priced"
        while (answer := http.post("/v1/chat/completions", json=body)).status_code == 200:
            pass
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert "resets at" in error["message"] and _info(gw, key)["budget_reset_at"][:10] in error["message"]
    assert int(answer.headers["Retry-After"]) <= 86400


def test_one_parallel_request_with_a_slow_backend(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["llama-3.2-8b"]) as slow:
        slow.first_byte_delay = 1.0
        gw = start_gateway(keyed({"v": {"url": slow.url}}))
        key = new_key(gw, max_parallel_requests=1)
        started = time.monotonic()
        statuses = asyncio.run(_concurrent(gw, key, 5))
        assert sorted(statuses) == [200, 429, 429, 429, 429]
        assert time.monotonic() - started < 5, "refusals do not wait for the slow one"
        assert asyncio.run(_concurrent(gw, key, 1)) == [200], "the slot is free again"


def test_tokens_per_minute_reserve_then_settle(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}, auth={"mode": "required", "master_key": "sk-master-test-1234",
                                                            "rate_limit_headers": "always"}))
    key = new_key(gw, tpm_limit=1000)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(model="llama-3.2-8b", messages=MESSAGES, max_tokens=900)
        remaining_after_reserve = int(raw.headers["x-ratelimit-remaining-tokens"])
        assert remaining_after_reserve < 100, "the whole max_tokens is reserved up front"
        answer = raw.parse()
        assert answer.usage is not None
        # Settled to the real usage, so the next request has room for another large reservation.
        again = c.chat.completions.with_raw_response.create(model="llama-3.2-8b", messages=MESSAGES, max_tokens=800)
        assert again.http_response.status_code == 200
        try:
            c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, max_tokens=2000)
            raise AssertionError("a reservation over the whole limit can never pass")
        except openai.RateLimitError as exc:
            assert "tokens" in str(exc)


def test_a_stream_is_counted_and_the_extra_usage_chunk_is_hidden(start_gateway: GatewayFactory,
                                                                  vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    key = new_key(gw, token_budget=100000)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        chunks = list(c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True))
        assert chunks and all(chunk.choices for chunk in chunks), "no usage-only chunk the client did not ask for"
        asked = list(c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True}))
        assert asked[-1].choices == [] and asked[-1].usage is not None
    upstream = [r.body for r in vllm.requests if r.path == "/v1/chat/completions"]
    assert all(b["stream_options"] == {"include_usage": True} for b in upstream)
    usage = asked[-1].usage
    assert _info(gw, key)["spend_tokens"] == 2 * usage.total_tokens


def test_a_spent_budget_stays_spent_after_a_restart(vllm: FakeVLLM, tmp_path: Path) -> None:
    config = keyed({"v": {"url": vllm.url}}, database_url=f"sqlite:///{tmp_path / 'state.db'}")
    with ThreadGateway(config) as gw:
        key = new_key(gw, token_budget=100, budget_duration="30d")
        statuses = asyncio.run(_sequential(gw, key, 30))
        assert 200 in statuses and statuses[-1] == 429
        spent = _info(gw, key)["spend_tokens"]
    with ThreadGateway(config) as again:
        assert _info(again, key)["spend_tokens"] == spent
        assert asyncio.run(_sequential(again, key, 1)) == [429]


async def _sequential(gw: ThreadGateway, key: str, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        body = {"model": "llama-3.2-8b", "messages": MESSAGES, "max_tokens": 20}
        return [(await http.post("/v1/chat/completions", json=body)).status_code for _ in range(count)]
