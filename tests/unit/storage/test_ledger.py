"""The usage ledger: every recorded event written once, in batches, off the request path, through outages."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from synapse_gateway.storage import Database, UsageEvent, UsageLedger, open_database, open_migrated
from tests.unit.storage.conftest import with_params

UNREACHABLE = "postgresql://127.0.0.1:1/x"
FAST_RETRY = (0.01, 0.05)


def event(n: int, **fields: object) -> UsageEvent:
    values: dict[str, object] = {
        "time": 1_796_000_000.0 + n, "request_id": f"r{n}", "status": 200, "latency_ms": 12.5,
        "path": "/v1/chat/completions",
    }
    return UsageEvent(**(values | fields))  # type: ignore[arg-type]


def metric(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, name
    return value


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def request_ids(db: Database) -> list[str]:
    return [row["request_id"] for row in await db.fetch("SELECT request_id FROM usage_events ORDER BY id")]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def admin(db: Database) -> Database:
    """The test's own connection to the ledger's database (conftest's `db`: migrated, per dialect)."""
    return db


class Connector:
    """A ledger's `connect` that opens a fresh database per call and remembers it; the test closes them all,
    as the ledger borrows its database and never closes it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[Database] = []

    async def __call__(self) -> Database:
        self.opened.append(await open_database(self.url))
        return self.opened[-1]


@pytest.fixture
async def connecting() -> AsyncIterator[Callable[[str], Connector]]:
    connectors: list[Connector] = []

    def make(url: str) -> Connector:
        connectors.append(Connector(url))
        return connectors[-1]

    yield make
    for connector in connectors:
        for db in connector.opened:
            await db.close()


async def test_every_recorded_event_becomes_one_row(
    url: str, admin: Database, registry: CollectorRegistry, connecting: Callable[[str], Connector]
) -> None:
    ledger = UsageLedger(connecting(url), registry, batch_size=50, flush_interval=30)
    full = event(
        0, key_id="k1", model="llama", served_model="llama-3.2-8b", backend="vllm-a", route="chat", status=429,
        tokens_in=12, tokens_out=34, audio_seconds=1.5, characters=99, ttft_ms=3.25, stream=True, cost=0.125,
    )
    await ledger.start()
    ledger.record(full)
    for n in range(1, 120):
        ledger.record(event(n))
    await ledger.close()
    assert await request_ids(admin) == [f"r{n}" for n in range(120)]
    row = (await admin.fetch("SELECT * FROM usage_events WHERE request_id = 'r0'"))[0]
    del row["id"]
    assert row | {"stream": bool(row["stream"])} == full._asdict()
    assert (ledger.written, ledger.dropped) == (120, 0)
    assert metric(registry, "synapse_usage_events_written_total") == 120
    assert metric(registry, "synapse_usage_events_dropped_total") == 0
    assert metric(registry, "synapse_usage_buffer_events") == 0


async def test_full_batches_go_at_once_and_the_rest_waits_for_the_interval(
    sqlite_url: str, registry: CollectorRegistry, connecting: Callable[[str], Connector]
) -> None:
    admin = await open_migrated(sqlite_url)
    ledger = UsageLedger(connecting(sqlite_url), registry, batch_size=3, flush_interval=0.3)
    try:
        await ledger.start()
        for n in range(7):
            ledger.record(event(n))
        await eventually(lambda: ledger.written == 6)  # two full batches, long before the interval
        started = time.monotonic()
        assert metric(registry, "synapse_usage_buffer_events") == 1
        await eventually(lambda: ledger.written == 7)  # the last one, after the flush interval
        assert time.monotonic() - started > 0.1
        assert await request_ids(admin) == [f"r{n}" for n in range(7)]
    finally:
        await ledger.close()
        await admin.close()


async def test_a_full_buffer_drops_new_events_and_counts_them_exactly(
    sqlite_url: str, registry: CollectorRegistry, connecting: Callable[[str], Connector]
) -> None:
    admin = await open_migrated(sqlite_url)
    ledger = UsageLedger(connecting(sqlite_url), registry, buffer_size=10, batch_size=4, flush_interval=30)
    try:
        for n in range(25):  # before start: nothing is written, the buffer fills
            ledger.record(event(n))
        assert ledger.dropped == 15 and metric(registry, "synapse_usage_events_dropped_total") == 15
        assert metric(registry, "synapse_usage_buffer_events") == 10
        await ledger.start()
        await ledger.close()
        assert await request_ids(admin) == [f"r{n}" for n in range(10)]  # the oldest kept, the newest dropped
        assert (ledger.written, ledger.dropped) == (10, 15)
        ledger.record(event(99))  # after close: counted, never raised
        assert ledger.dropped == 16
    finally:
        await admin.close()


async def test_an_event_the_database_cannot_store_is_dropped_alone(
    url: str, admin: Database, connecting: Callable[[str], Connector]
) -> None:
    ledger = UsageLedger(connecting(url), CollectorRegistry(), batch_size=10, flush_interval=30, retry=FAST_RETRY)
    await ledger.start()
    ledger.record(event(0))
    ledger.record(event(1, latency_ms=float("nan")))
    ledger.record(event(2, tokens_in=2**40))
    ledger.record(event(3, stream=1))  # PostgreSQL's driver refuses 1 for a boolean: converted
    await ledger.close()
    assert await request_ids(admin) == ["r0", "r3"]
    assert (ledger.written, ledger.dropped) == (2, 2)


async def test_an_unreachable_database_never_blocks_record_and_close_counts_the_loss(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = UsageLedger(Connector(UNREACHABLE), registry, buffer_size=100, batch_size=10,
                         flush_interval=0.01, retry=FAST_RETRY)
    await ledger.start()  # the gateway starts although its database is down
    started = time.monotonic()
    for n in range(150):
        ledger.record(event(n))
    assert time.monotonic() - started < 0.05
    await eventually(lambda: metric(registry, "synapse_usage_write_errors_total") >= 3)
    started = time.monotonic()
    await ledger.close(timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert (ledger.written, ledger.dropped) == (0, 150)
    assert metric(registry, "synapse_usage_events_dropped_total") == 150
    warnings = [r.getMessage() for r in caplog.records if r.name == "synapse.usage" and r.levelno == logging.WARNING]
    assert sum("cannot be written" in message for message in warnings) == 1  # one per outage, not per retry
    assert any("100 events unwritten" in message for message in warnings)


async def test_a_database_down_at_start_gets_everything_once_it_comes_up(
    url: str, admin: Database, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture,
    connecting: Callable[[str], Connector],
) -> None:
    caplog.set_level(logging.INFO, logger="synapse.usage")
    up = asyncio.Event()
    database = connecting(url)

    async def connect() -> Database:
        return await (database() if up.is_set() else open_database(UNREACHABLE))

    ledger = UsageLedger(connect, registry, batch_size=4, flush_interval=0.01, retry=FAST_RETRY)
    await ledger.start()
    for n in range(5):
        ledger.record(event(n))
    await eventually(lambda: metric(registry, "synapse_usage_write_errors_total") >= 2)
    for n in range(5, 10):
        ledger.record(event(n))
    up.set()
    await eventually(lambda: ledger.written == 10)
    await ledger.close()
    assert await request_ids(admin) == [f"r{n}" for n in range(10)]
    assert any("written again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_a_closed_sqlite_connection_is_replaced_and_nothing_is_lost(
    sqlite_url: str, registry: CollectorRegistry, connecting: Callable[[str], Connector]
) -> None:
    await (await open_migrated(sqlite_url)).close()
    connect = connecting(sqlite_url)
    opened = connect.opened
    ledger = UsageLedger(connect, registry, batch_size=5, flush_interval=0.01, retry=FAST_RETRY)
    await ledger.start()
    try:
        for n in range(5):
            ledger.record(event(n))
        await eventually(lambda: ledger.written == 5)
        await opened[0].close()  # the connection goes away under the ledger
        for n in range(5, 12):
            ledger.record(event(n))
        await eventually(lambda: ledger.written == 12)
        assert len(opened) == 2 and metric(registry, "synapse_usage_write_errors_total") >= 1
        assert await request_ids(opened[1]) == [f"r{n}" for n in range(12)]
    finally:
        await ledger.close()


async def test_a_table_gone_for_a_while_loses_nothing_buffered(
    url: str, admin: Database, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture,
    connecting: Callable[[str], Connector],
) -> None:
    ledger = UsageLedger(connecting(url), registry, batch_size=2, flush_interval=0.01, retry=FAST_RETRY)
    await ledger.start()
    try:
        for n in range(3):
            ledger.record(event(n))
        await eventually(lambda: ledger.written == 3)
        await admin.execute("ALTER TABLE usage_events RENAME TO usage_events_away")
        for n in range(3, 10):
            ledger.record(event(n))
        await eventually(lambda: metric(registry, "synapse_usage_write_errors_total") >= 3)
        assert ledger.written == 3 and metric(registry, "synapse_usage_buffer_events") == 7
        await admin.execute("ALTER TABLE usage_events_away RENAME TO usage_events")
        await eventually(lambda: ledger.written == 10)
    finally:
        await ledger.close()
    assert await request_ids(admin) == [f"r{n}" for n in range(10)]
    warnings = [r for r in caplog.records if r.name == "synapse.usage" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1


async def test_a_postgresql_connection_killed_mid_write_loses_nothing_and_the_shared_pool_stays_open(
    pg_url: str, registry: CollectorRegistry
) -> None:
    """As in the gateway: the ledger borrows the one database the whole process shares, and must not close it."""
    app = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = await open_migrated(pg_url)
    shared = await open_database(with_params(pg_url, application_name=app))
    locked, release = asyncio.Event(), asyncio.Event()

    async def borrowed() -> Database:
        return shared

    async def hold_table() -> None:
        async with admin.transaction() as tx:
            await tx.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
            locked.set()
            await release.wait()

    async def ledger_waiting() -> bool:
        sql = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = ? AND wait_event_type = 'Lock'"
        return bool(await shared.fetchval(sql, app) == 1)

    ledger = UsageLedger(borrowed, registry, batch_size=3, flush_interval=0.01, retry=FAST_RETRY)
    await ledger.start()
    holding = asyncio.create_task(hold_table())
    try:
        await locked.wait()
        for n in range(3):
            ledger.record(event(n))
        deadline = time.monotonic() + 5
        while not await ledger_waiting():  # the batch's INSERT waits on the table lock
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        killed = await admin.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = ?", app
        )
        assert killed >= 1
        await eventually(lambda: metric(registry, "synapse_usage_write_errors_total") >= 1)
        for n in range(3, 20):
            ledger.record(event(n))
        release.set()
        await eventually(lambda: ledger.written == 20)
        await ledger.close()
        assert await request_ids(shared) == [f"r{n}" for n in range(20)]  # still open, and every event in it
    finally:
        release.set()
        await holding
        await ledger.close()
        await shared.close()
        await admin.close()


@pytest.mark.parametrize("changes", [
    {},
    {"key_id": None, "model": None, "tokens_in": None, "tokens_out": None, "cost": None, "ttft_ms": None},
    {"tokens_in": 2**31},
    {"cost": float("inf")},
    {"stream": 1},
])
def test_the_fast_row_is_the_checked_row_or_defers_to_it(changes: dict[str, object]) -> None:
    from synapse_gateway.storage.ledger import UsageEvent, _checked_row, _row

    fields: dict[str, object] = {
        "time": 1.7e9, "request_id": "r", "key_id": "k", "model": "m", "served_model": "s", "backend": "b",
        "route": "m", "status": 200, "tokens_in": 3, "tokens_out": 4, "audio_seconds": 1.5, "characters": 9,
        "latency_ms": 2.5, "ttft_ms": 1.25, "stream": True, "cost": 0.5, "path": "/v1/chat/completions"}
    event = UsageEvent(**{**fields, **changes})  # type: ignore[arg-type]
    try:
        checked: tuple[object, ...] | None = _checked_row(event)
    except (TypeError, ValueError):
        checked = None
    if checked is None:
        with pytest.raises((TypeError, ValueError)):
            _row(event)
    else:
        assert _row(event) == checked
