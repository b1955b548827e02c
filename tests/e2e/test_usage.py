"""The usage ledger end to end: one event per request (streams, failovers, disconnects), and a database
outage that loses no request."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, dead_url
from tests.e2e.test_keys import ADMIN, keyed, new_key
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

MESSAGES = [{"role": "user", "content": "Hi"}]
FAST = {"flush_interval": 0.05}


def rows_of(db: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The ledger's rows, once there are `count` of them (written off the request path, so a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM usage_events ORDER BY id")]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def test_one_event_per_request_through_stream_failover_and_disconnect(start_gateway: GatewayFactory,
                                                                      tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    with FakeVLLM(["llama-3.2-8b"]) as live, FakeVLLM(["llama-3.2-8b"], chunk_delay=0.2, stream_chunks=20) as slow:
        backends = {"down": {"url": dead_url(), "discover": False}, "v": {"url": live.url, "discover": False},
                    "slow": {"url": slow.url, "discover": False}}
        routes = [{"model": "llama-3.2-8b", "deployments": [{"backend": "down"}, {"backend": "v"}]},
                  {"model": "slow", "backend": "slow", "upstream": "llama-3.2-8b"}]
        gw = start_gateway(keyed(backends, routes=routes, database_url=f"sqlite:///{db}", usage=FAST))
        key = new_key(gw)
        key_id = key.split("-")[2]
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
            plain = c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
            streamed = list(c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True))
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="nope", messages=MESSAGES)
        with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as http, http.stream(
                "POST", "/v1/chat/completions", json={"model": "slow", "messages": MESSAGES, "stream": True}) as s:
            next(s.iter_lines())  # the first event arrived: leave mid-stream
        rows = rows_of(db, 4)
    assert len(rows) == 4, rows
    by_model = {r["model"]: r for r in rows}
    assert {r["key_id"] for r in rows} == {key_id}
    ok = [r for r in rows if r["model"] == "llama-3.2-8b"]
    assert [r["status"] for r in ok] == [200, 200] and all(r["backend"] == "v" for r in ok), "the failover's answer"
    assert plain.usage is not None
    assert ok[0]["tokens_in"] == plain.usage.prompt_tokens and ok[0]["tokens_out"] == plain.usage.completion_tokens
    assert ok[1]["stream"] and ok[1]["tokens_out"] and ok[1]["ttft_ms"] is not None, "a stream's usage, asked for"
    assert all(chunk.choices for chunk in streamed)
    assert by_model["nope"]["status"] == 404
    assert by_model["slow"]["status"] == 499 and by_model["slow"]["served_model"] == "llama-3.2-8b"


def test_the_usage_report_sums_by_key_model_and_day(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                     tmp_path: Path) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}, database_url=f"sqlite:///{tmp_path / 'u.db'}", usage=FAST))
    first, second = new_key(gw), new_key(gw)
    for key, times in ((first, 3), (second, 1)):
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
            for _ in range(times):
                c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    rows_of(tmp_path / "u.db", 4)
    with gw.http() as http:
        report = http.get("/usage/report", params={"group_by": "key,model"}, headers=ADMIN).json()["data"]
    counts = {row["key_id"]: row["requests"] for row in report}
    assert counts == {first.split("-")[2]: 3, second.split("-")[2]: 1}
    assert all(row["tokens_in"] > 0 and row["tokens_out"] > 0 for row in report)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_database_loses_no_request_counts_the_drop_and_refuses_key_writes(vllm: FakeVLLM) -> None:
    config = keyed({"v": {"url": vllm.url}}, database_url=f"postgresql://nobody@127.0.0.1:{_closed_port()}/none",
                   usage={"buffer_size": 100, "flush_interval": 0.05})
    with ThreadGateway(config) as gw, openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-master-test-1234",
                                                    max_retries=0) as c:
        for _ in range(120):
            assert c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices
        with gw.http() as http:
            metrics = http.get("/metrics", headers=ADMIN).text
            refused = http.post("/key/generate", json={}, headers=ADMIN)
            report = http.get("/usage/report", headers=ADMIN)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_unavailable"
    assert report.status_code == 503 and "Retry-After" in report.headers
    dropped = [line for line in metrics.splitlines() if line.startswith("synapse_usage_events_dropped_total")]
    assert dropped and float(dropped[0].split()[-1]) == 20.0, dropped


def test_postgresql_going_away_mid_run_loses_no_request_and_no_event(vllm: FakeVLLM) -> None:
    from tests.e2e.test_key_replicas import pg_schema_url
    from tests.services import POSTGRES_HOST, POSTGRES_PORT, CuttableRelay

    with pg_schema_url() as (url, query), CuttableRelay(POSTGRES_HOST, POSTGRES_PORT) as relay:
        relayed = url.replace(f"{POSTGRES_HOST}:{POSTGRES_PORT}", f"127.0.0.1:{relay.port}")
        config = keyed({"v": {"url": vllm.url}}, database_url=relayed, usage={"flush_interval": 0.05})
        with ThreadGateway(config) as gw, openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-master-test-1234",
                                                        max_retries=0) as c:
            def ask(times: int) -> None:
                for _ in range(times):
                    assert c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices

            ask(10)
            assert _eventually(lambda: query("SELECT count(*) FROM usage_events") == 10)
            relay.cut()
            ask(15)  # served as usual while the database is away
            time.sleep(0.3)
            assert query("SELECT count(*) FROM usage_events") == 10, "nothing could be written meanwhile"
            relay.restore()
            assert _eventually(lambda: query("SELECT count(*) FROM usage_events") == 25, timeout=20)
            assert gw.gateway.ledger is not None and gw.gateway.ledger.dropped == 0


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
