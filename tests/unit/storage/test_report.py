"""Usage reports: the same numbers from the same events on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from synapse_gateway.storage import Database, UsageEvent, UsageLedger, open_migrated, usage_report

DAY1 = datetime(2026, 11, 29, tzinfo=UTC).timestamp()
DAY2 = DAY1 + 86400
COLUMNS = ("requests", "errors", "tokens_in", "tokens_out", "cost", "audio_seconds", "characters", "avg_latency_ms")
EVENTS = [
    UsageEvent(time=DAY1 + 100, request_id="e1", key_id="k1", model="llama", backend="a", status=200,
               tokens_in=10, tokens_out=20, cost=0.25, latency_ms=10, path="/v1/chat/completions"),
    UsageEvent(time=DAY2 - 0.5, request_id="e2", key_id="k1", model="llama", backend="b", status=500,
               latency_ms=30, path="/v1/chat/completions"),
    UsageEvent(time=DAY1 + 200, request_id="e3", model="qwen", backend="a", status=200, tokens_in=5,
               tokens_out=5, cost=0.5, audio_seconds=2.5, latency_ms=20, path="/v1/audio/transcriptions"),
    UsageEvent(time=DAY2 + 0.25, request_id="e4", key_id="k2", model="llama", backend="a", status=429,
               tokens_in=1, tokens_out=0, cost=0.0, characters=100, latency_ms=40, path="/v1/audio/speech"),
    UsageEvent(time=DAY2 + 3600, request_id="e5", key_id="k1", model="qwen", backend="b", status=200,
               tokens_in=7, tokens_out=8, cost=0.25, latency_ms=50, path="/v1/chat/completions", stream=True),
]


def totals(*values: float) -> dict[str, float]:
    return dict(zip(COLUMNS, values, strict=True))


@pytest.fixture
async def events_db(url: str) -> AsyncIterator[Database]:
    """A database holding EVENTS, written the way the gateway writes them: through the ledger."""
    db = await open_migrated(url)

    async def borrowed() -> Database:
        return db

    try:
        ledger = UsageLedger(borrowed, CollectorRegistry(), flush_interval=30)
        await ledger.start()
        for event in EVENTS:
            ledger.record(event)
        await ledger.close()
        assert ledger.written == len(EVENTS)
        yield db
    finally:
        await db.close()


async def test_by_day_and_key_splits_days_at_utc_midnight(events_db: Database) -> None:
    report = await usage_report(events_db, since=None, until=None, group_by=["key", "day"])
    assert report == [
        {"day": "2026-11-29", "key_id": None, **totals(1, 0, 5, 5, 0.5, 2.5, 0, 20.0)},
        {"day": "2026-11-29", "key_id": "k1", **totals(2, 1, 10, 20, 0.25, 0.0, 0, 20.0)},
        {"day": "2026-11-30", "key_id": "k1", **totals(1, 0, 7, 8, 0.25, 0.0, 0, 50.0)},
        {"day": "2026-11-30", "key_id": "k2", **totals(1, 1, 1, 0, 0.0, 0.0, 100, 40.0)},
    ]
    assert all(type(row["requests"]) is int and type(row["cost"]) is float for row in report)


async def test_by_model_within_a_window_that_excludes_its_end(events_db: Database) -> None:
    report = await usage_report(events_db, since=DAY1 + 150, until=DAY2 + 0.25, group_by=["model"])
    assert report == [
        {"model": "llama", **totals(1, 1, 0, 0, 0.0, 0.0, 0, 30.0)},
        {"model": "qwen", **totals(1, 0, 5, 5, 0.5, 2.5, 0, 20.0)},
    ]


async def test_one_key_in_total(events_db: Database) -> None:
    report = await usage_report(events_db, since=None, until=None, group_by=[], key_id="k1")
    assert report == [totals(3, 1, 17, 28, 0.5, 0.0, 0, 30.0)]


async def test_by_backend_and_key_sorts_by_key_first(events_db: Database) -> None:
    report = await usage_report(events_db, since=DAY1, until=None, group_by=["backend", "key"])
    assert [(row["key_id"], row["backend"], row["requests"]) for row in report] == [
        (None, "a", 1), ("k1", "a", 1), ("k1", "b", 2), ("k2", "a", 1),
    ]


async def test_an_empty_window_has_no_rows(events_db: Database) -> None:
    assert await usage_report(events_db, since=DAY2 + 7200, until=None, group_by=[]) == []
    assert await usage_report(events_db, since=DAY2 + 7200, until=None, group_by=["day"]) == []


async def test_an_unknown_grouping_is_refused(events_db: Database) -> None:
    with pytest.raises(ValueError, match=r"'route'.*'day', 'key', 'model', 'backend'"):
        await usage_report(events_db, since=None, until=None, group_by=["route"])  # type: ignore[list-item]
