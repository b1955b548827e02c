"""Two gateway processes share one GPU through the real Redis: no double wake, no budget violation."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ProcessGateway

MESSAGES = [{"role": "user", "content": "Hi"}]


def _redis_or_skip() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        reason = "no Redis answers at 127.0.0.1:6379 (start redis-server to run the multi-replica test)"
        if os.environ.get("SYNAPSE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _lifecycle_calls(fake: FakeVLLM) -> list[str]:
    return [r.path.split("?")[0] for r in fake.requests if r.path.startswith(("/sleep", "/wake_up"))]


def test_two_replicas_hammering_one_gpu(tmp_path: Path) -> None:
    _redis_or_skip()
    with FakeVLLM(["alpha"], sleep_mode=True, wake_delay=0.05) as alpha, \
            FakeVLLM(["beta"], sleep_mode=True, wake_delay=0.05) as beta:
        config = {
            "gpu": {"memory": "16GiB", "redis_url": "redis://127.0.0.1:6379/0",
                    "redis_prefix": f"synapse-test-{uuid.uuid4().hex[:8]}", "lease_ttl": 5},
            "backends": {name: {"url": fake.url, "protocol": "vllm", "models": [name], "lifecycle": {
                "driver": "vllm-sleep", "memory": "10GiB", "sleeping_memory": "1GiB"}}
                for name, fake in (("alpha", alpha), ("beta", beta))},
        }
        path = tmp_path / "synapse.yaml"
        path.write_bytes(orjson.dumps(config))
        replicas = [ProcessGateway(path, tmp_path / f"replica{i}.log").start() for i in range(2)]
        both_awake: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if not alpha.is_sleeping and not beta.is_sleeping:
                    both_awake.append(time.monotonic())
                time.sleep(0.001)

        def hammer(i: int) -> int:
            replica = replicas[i % 2]
            model = "alpha" if (i // 3) % 2 else "beta"
            with httpx.Client(base_url=replica.url, timeout=60) as http:
                answer = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES})
                return answer.status_code

        try:
            time.sleep(0.5)  # let the start-up eviction settle
            watcher = threading.Thread(target=watch)
            watcher.start()
            with ThreadPoolExecutor(max_workers=8) as pool:
                statuses = list(pool.map(hammer, range(120)))
            stop.set()
            watcher.join()
        finally:
            stop.set()
            for replica in replicas:
                replica.stop()
        assert statuses == [200] * 120
        assert both_awake == [], "the two 10 GiB backends were awake together on a 16 GiB budget"
        trail = {name: [r.path.split("?")[0] for r in fake.requests if r.path != "/v1/models"]
                 for name, fake in (("alpha", alpha), ("beta", beta))}
        assert alpha.requests_while_sleeping == beta.requests_while_sleeping == 0, trail
        for fake in (alpha, beta):
            calls = _lifecycle_calls(fake)
            assert all(a != b for a, b in itertools.pairwise(calls)), f"a double wake or sleep: {calls}"
            assert calls.count("/wake_up") >= 2
