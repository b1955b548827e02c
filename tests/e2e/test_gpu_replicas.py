"""Two gateway processes share one GPU budget through the real Redis: what the backends hold never exceeds it."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ProcessGateway

GiB = 2**30
BUDGET = 16 * GiB
MESSAGES = [{"role": "user", "content": "Hi"}]
# Two large engines that never fit together, and a small one that fits beside either.
SIZES = {"alpha": 10 * GiB, "beta": 10 * GiB, "gamma": 4 * GiB}
ASLEEP = GiB


def _redis_or_skip() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        reason = "no Redis answers at 127.0.0.1:6379 (start redis-server to run the multi-replica test)"
        if os.environ.get("SYNAPSE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


class Ledger:
    """The memory the engines really hold, written by the engines themselves at the moment it changes.

    Nothing polls it: an overlap however short is recorded when the wake that causes it begins.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held: dict[str, int] = {}
        self.peak = 0
        self.over: list[dict[str, int]] = []

    def hold(self, engine: str, amount: int) -> None:
        with self._lock:
            self.held[engine] = amount
            total = sum(self.held.values())
            self.peak = max(self.peak, total)
            if total > BUDGET:
                self.over.append(dict(self.held))


class MeteredVLLM(FakeVLLM):
    """A sleep-mode vLLM that reports to the ledger: full memory from the start of a wake, little once asleep."""

    def __init__(self, name: str, ledger: Ledger) -> None:
        super().__init__([name], sleep_mode=True, wake_delay=0.05)
        self.name, self.ledger = name, ledger
        self.first_byte_delay = 0.05  # requests in flight long enough for an eviction to be able to hit them
        self.sleeping_tags, self.sleep_level = {"weights", "kv_cache"}, 1  # as after a previous sleep
        ledger.hold(name, ASLEEP)

    async def _wake_up(self, request: web.Request) -> web.Response:
        if self.is_sleeping:
            self.ledger.hold(self.name, SIZES[self.name])  # the allocation starts before the answer
        return await super()._wake_up(request)

    async def _sleep(self, request: web.Request) -> web.Response:
        answer = await super()._sleep(request)
        if self.is_sleeping:
            self.ledger.hold(self.name, ASLEEP)
        return answer


@contextmanager
def two_replicas(tmp_path: Path) -> Iterator[tuple[dict[str, MeteredVLLM], list[ProcessGateway], Ledger]]:
    """Three metered engines under one 16 GiB budget, and two gateway processes sharing it through Redis."""
    ledger = Ledger()
    with ExitStack() as stack:
        engines = {name: stack.enter_context(MeteredVLLM(name, ledger)) for name in SIZES}
        config = {
            "gpu": {"memory": "16GiB", "redis_url": "redis://127.0.0.1:6379/0",
                    "redis_prefix": f"synapse-test-{uuid.uuid4().hex[:8]}", "lease_ttl": 5},
            "backends": {name: {"url": engine.url, "protocol": "vllm", "models": [name], "lifecycle": {
                "driver": "vllm-sleep", "memory": SIZES[name], "sleeping_memory": ASLEEP}}
                for name, engine in engines.items()},
        }
        path = tmp_path / "synapse.yaml"
        path.write_bytes(orjson.dumps(config))
        replicas: list[ProcessGateway] = []
        try:
            for i in range(2):
                replicas.append(ProcessGateway(path, tmp_path / f"replica{i}.log").start())
            yield engines, replicas, ledger
        finally:
            for replica in replicas:
                replica.stop()


def _chat(replica: ProcessGateway, model: str) -> int:
    with httpx.Client(base_url=replica.url, timeout=60) as http:
        return http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES}).status_code


def _lifecycle_calls(engine: FakeVLLM) -> list[str]:
    return [r.path.split("?")[0] for r in engine.requests if r.path.startswith(("/sleep", "/wake_up"))]


def test_alternating_bursts_on_two_replicas_stay_within_one_budget(tmp_path: Path) -> None:
    _redis_or_skip()
    with two_replicas(tmp_path) as (engines, replicas, ledger):
        # Each round, both replicas get a burst at once, for models that cannot be awake together.
        rounds = [("alpha", "beta"), ("beta", "gamma"), ("gamma", "alpha"), ("beta", "alpha"), ("alpha", "gamma")]
        plan = [(replicas[(i + k) % 2], model) for i, pair in enumerate(rounds * 2)
                for k, model in enumerate(pair) for _ in range(4)]
        statuses: list[int] = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, len(plan), 8):
                statuses += pool.map(lambda sent: _chat(*sent), plan[start:start + 8])
    assert statuses == [200] * len(plan)
    assert ledger.over == [], f"the engines held more than the budget: {ledger.over[:3]}"
    assert ledger.peak > 10 * GiB, "the test never had a large engine awake"
    for engine in engines.values():
        assert engine.requests_while_sleeping == 0, engine.name
        assert engine.sleeps_while_busy == 0, f"{engine.name} was put to sleep with requests in flight"
        calls = _lifecycle_calls(engine)
        assert all(a != b for a, b in itertools.pairwise(calls)), f"a double wake or sleep: {calls}"
    assert sum(_lifecycle_calls(e).count("/wake_up") for e in engines.values()) >= 6


def test_an_operator_sleep_on_a_stale_replica_really_sleeps_the_engine(tmp_path: Path) -> None:
    _redis_or_skip()
    with two_replicas(tmp_path) as (engines, replicas, ledger):
        assert _chat(replicas[0], "alpha") == 200  # woken by replica 0; replica 1 has not looked since
        assert not engines["alpha"].is_sleeping
        with httpx.Client(base_url=replicas[1].url, timeout=30) as http:
            answer = http.post("/admin/gpu/alpha/sleep", json={})
            status: dict[str, Any] = http.get("/admin/gpu").json()
        assert (answer.status_code, answer.json()["state"]) == (200, "asleep")
        assert engines["alpha"].is_sleeping, "the replica answered 'asleep' while the engine stayed awake"
        assert {u["unit"]: u["state"] for u in status["units"]}["alpha"] == "asleep"
        assert _chat(replicas[0], "alpha") == 200  # replica 0 learns it and wakes it again
    assert ledger.over == []
