"""Two gateway processes sharing PostgreSQL (keys, usage) and Redis (limits): one limit, one key state."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from synapse_gateway.storage import open_database
from tests.e2e.test_keys import ADMIN, MASTER
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ProcessGateway
from tests.services import require_postgres, require_redis

MESSAGES = [{"role": "user", "content": "Hi"}]


async def _run_sql(url: str, sql: str) -> None:
    admin = await open_database(url)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


async def _fetchval(url: str, sql: str) -> Any:
    database = await open_database(url)
    try:
        return await database.fetchval(sql)
    finally:
        await database.close()


@contextlib.contextmanager
def pg_schema_url() -> Iterator[tuple[str, Callable[[str], Any]]]:
    """A PostgreSQL URL whose search_path is a fresh schema (dropped at the end), and a query function."""
    base = require_postgres()
    schema = f"e2e_{uuid.uuid4().hex[:12]}"
    asyncio.run(_run_sql(base, f"CREATE SCHEMA {schema}"))
    url = f"{base}?search_path={schema}"
    try:
        yield url, lambda sql: asyncio.run(_fetchval(url, sql))
    finally:
        asyncio.run(_run_sql(base, f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema_url() as (url, _):
        yield url


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str, vllm: FakeVLLM) -> Iterator[tuple[ProcessGateway, ProcessGateway]]:
    redis_url = require_redis()
    config: dict[str, Any] = {
        "auth": {"mode": "required", "master_key": MASTER},
        "backends": {"v": {"url": vllm.url}},
        "database_url": pg_url, "redis_url": redis_url, "redis_prefix": f"t{uuid.uuid4().hex[:10]}",
    }
    path = tmp_path / "synapse.yaml"
    path.write_bytes(orjson.dumps(config))
    started: list[ProcessGateway] = []
    try:
        for name in ("a", "b"):
            started.append(ProcessGateway(path, tmp_path / f"{name}.log").start())
        yield started[0], started[1]
    finally:
        for gateway in started:
            gateway.stop()


def _generate(gateway: ProcessGateway, **settings: Any) -> str:
    answer = httpx.post(gateway.url + "/key/generate", json=settings, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    key: str = answer.json()["key"]
    return key


def _chat(gateway: ProcessGateway, key: str) -> int:
    body = {"model": "llama-3.2-8b", "messages": MESSAGES}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def test_a_key_made_on_one_replica_works_on_the_other_and_a_revocation_reaches_it_within_a_second(
        replicas: tuple[ProcessGateway, ProcessGateway]) -> None:
    a, b = replicas
    key = _generate(a)
    deadline = time.monotonic() + 1.0
    while _chat(b, key) != 200:
        assert time.monotonic() < deadline, "the new key reached the other replica within a second"
    assert httpx.post(a.url + "/key/block", json={"key": key}, headers=ADMIN).status_code == 200
    revoked_at = time.monotonic()
    while _chat(b, key) == 200:
        assert time.monotonic() - revoked_at < 1.0, "the revocation reached the other replica within a second"
    assert _chat(b, key) == 401 and _chat(a, key) == 401
    secret = key.rsplit("-", 1)[1]
    for replica in (a, b):
        assert secret not in replica.log() and MASTER not in replica.log(), "no key material in a replica's log"
        assert key.split("-")[2] in replica.log(), "the access log names the key by its public id"


def test_two_replicas_hold_one_rpm_limit(replicas: tuple[ProcessGateway, ProcessGateway]) -> None:
    a, b = replicas
    key = _generate(a, rpm_limit=10)
    time.sleep(0.7)  # the key reaches b

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
            body = {"model": "llama-3.2-8b", "messages": MESSAGES}
            urls = itertools.islice(itertools.cycle([a.url, b.url]), 30)
            answers = await asyncio.gather(*(http.post(u + "/v1/chat/completions", json=body) for u in urls))
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20
