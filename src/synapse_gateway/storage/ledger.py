"""The usage ledger: one event per request, buffered in memory and written in batches off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from .database import Database, StorageError, StorageUnavailable

log = logging.getLogger("synapse.usage")

T = TypeVar("T")
_INT32 = 2**31  # INTEGER columns are 32-bit on PostgreSQL


class UsageEvent(NamedTuple):
    """One request's usage, a row of usage_events (its fields in column order, so that a checked event
    is itself the row). `model` is the name the client asked for, `served_model` the one that
    answered; `time` is unix seconds. A named tuple: one is made per request."""

    time: float
    request_id: str
    status: int
    latency_ms: float
    path: str
    key_id: str | None = None
    model: str | None = None
    served_model: str | None = None
    backend: str | None = None
    route: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    audio_seconds: float | None = None
    characters: int | None = None
    ttft_ms: float | None = None
    stream: bool = False
    cost: float | None = None


_COLUMNS = UsageEvent._fields
_INSERT = f"INSERT INTO usage_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


class UsageLedger:
    """Buffers usage events and writes them from one background task.

    `record` never waits and never fails: with the buffer full (the batch being written counts as
    buffered), the new event is dropped and counted. The database may be down at start or go away later;
    the writer retries with capped backoff and a failed batch goes back to the front of the buffer.

    The ledger borrows the database `connect` returns and never closes it: its owner does, after `close`.
    When the connection breaks, the ledger calls `connect` again; a provider sharing one pool may hand back
    the same one (asyncpg replaces dead connections itself), one that opens afresh hands a new one.
    Call `record` from the event loop's thread. One ledger per registry (its metrics are registered there)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Database]],
        registry: CollectorRegistry,
        *,
        buffer_size: int = 10000,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        retry: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        if buffer_size < 1 or batch_size < 1 or flush_interval <= 0 or not 0 < retry[0] <= retry[1]:
            raise ValueError("buffer_size and batch_size must be >= 1, flush_interval > 0, 0 < retry[0] <= retry[1]")
        self._connect = connect
        self._buffer_size, self._batch_size, self._flush_interval = buffer_size, batch_size, flush_interval
        self._retry_first, self._retry_cap = retry
        self._buffer: deque[UsageEvent] = deque()
        self._in_flight: list[UsageEvent] = []
        self._batch_ready, self._closing = asyncio.Event(), asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._db: Database | None = None
        self._closed = False
        self._failures = 0  # consecutive failed attempts: the first one of an outage is logged, not the rest
        self._full_logged = False
        self.written = 0
        self.dropped = 0
        self._written_total = Counter(
            "synapse_usage_events_written", "Usage events written to the database.", registry=registry
        )
        self._dropped_total = Counter(
            "synapse_usage_events_dropped",
            "Usage events lost: buffer full, not storable, or still unwritten at shutdown.",
            registry=registry,
        )
        self._errors_total = Counter(
            "synapse_usage_write_errors", "Failed attempts to connect or to write a batch of usage events.",
            registry=registry,
        )
        buffered = Gauge("synapse_usage_buffer_events", "Usage events waiting to be written.", registry=registry)
        buffered.set_function(lambda: len(self._buffer) + len(self._in_flight))

    def record(self, event: UsageEvent) -> None:
        """Queue one event; O(1), never blocks, never raises."""
        if self._closed or len(self._buffer) + len(self._in_flight) >= self._buffer_size:
            self._drop(1)
            if not self._full_logged and not self._closed:
                self._full_logged = True
                log.warning("usage buffer full (%d events): dropping new events until writes catch up",
                            self._buffer_size)
            return
        self._buffer.append(event)
        if len(self._buffer) >= self._batch_size:
            self._batch_ready.set()

    async def start(self) -> None:
        """Start the writer. It connects on its own schedule, so a database that is down delays nothing."""
        if self._task is not None or self._closed:
            raise RuntimeError("the usage ledger was already started (or closed): build a new one")
        self._task = asyncio.create_task(self._run(), name="synapse-usage-writer")

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered (for at most `timeout` seconds), then stop; what is left is counted dropped."""
        self._closing.set()
        self._batch_ready.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                # A batch cut off mid-write counts as lost even if its commit got through.
                self._task.cancel()
                await asyncio.wait({self._task})
        self._closed = True
        lost = len(self._buffer) + len(self._in_flight)
        self._buffer.clear()
        self._in_flight = []
        if lost:
            self._drop(lost)
            log.warning("usage ledger stopped with %d events unwritten; counted as dropped", lost)
        self._db = None

    async def _run(self) -> None:
        delay = self._retry_first
        while True:
            await self._wait_for_batch()
            if not self._buffer:
                if self._closing.is_set():
                    return
                continue
            if await self._write_batch():
                delay = self._retry_first
            else:
                await self._back_off(delay)
                delay = min(delay * 2, self._retry_cap)

    async def _wait_for_batch(self) -> None:
        """Until a batch is full, the flush interval passes, or close asks for everything now."""
        if len(self._buffer) >= self._batch_size or self._closing.is_set():
            return
        self._batch_ready.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._flush_interval):
                await self._batch_ready.wait()

    async def _write_batch(self) -> bool:
        """Write up to one batch in one transaction; on failure put it back at the front. True if written."""
        batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
        self._in_flight, rows = self._storable(batch)
        if not rows:
            return True
        try:
            db = await self._database()
            async with db.transaction() as tx:
                await tx.executemany(_INSERT, rows)
        except Exception as exc:  # the writer must outlive any failure, or every later event would be lost
            self._buffer.extendleft(reversed(self._in_flight))
            self._in_flight = []
            self._failed(exc)
            return False
        self._in_flight = []
        self.written += len(rows)
        self._written_total.inc(len(rows))
        self._full_logged = False
        if self._failures:
            log.info("usage events are written again after %d failed attempts; %d still buffered",
                     self._failures, len(self._buffer))
            self._failures = 0
        return True

    def _storable(self, batch: list[UsageEvent]) -> tuple[list[UsageEvent], list[tuple[Any, ...]]]:
        """Events with their rows, typed as the columns want. One the database could never take is dropped
        here: retried, it would hold back every batch behind it."""
        events, rows = [], []
        for event in batch:
            try:
                rows.append(_row(event))
            except (AttributeError, TypeError, ValueError):
                continue
            events.append(event)
        if len(events) < len(batch):
            self._drop(len(batch) - len(events))
            log.warning("dropped %d usage events the database cannot store (a field of the wrong type or range)",
                        len(batch) - len(events))
        return events, rows

    async def _database(self) -> Database:
        if self._db is None:
            self._db = await self._connect()
        return self._db

    def _failed(self, exc: Exception) -> None:
        self._errors_total.inc()
        self._failures += 1
        unexpected = not isinstance(exc, StorageError)
        if self._failures == 1:
            log.warning("usage events cannot be written (%s); keeping up to %d in memory and retrying",
                        exc, self._buffer_size, exc_info=unexpected)
        if unexpected or isinstance(exc, StorageUnavailable):
            self._db = None  # a broken connection: the next attempt asks `connect` again

    async def _back_off(self, delay: float) -> None:
        """Wait before retrying; a close that starts meanwhile cuts the wait short once."""
        if self._closing.is_set():
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closing.wait()

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._dropped_total.inc(count)


def _row(event: UsageEvent) -> tuple[Any, ...]:
    """The event as column values. The gateway's own events (typed, in range) take the fast path: this
    runs on the event loop once per request, so the field-by-field check is kept for the rest."""
    tokens_in, tokens_out, characters = event.tokens_in, event.tokens_out, event.characters
    cost, audio, ttft = event.cost, event.audio_seconds, event.ttft_ms
    if (type(event.time) is float and type(event.latency_ms) is float and type(event.status) is int
            and type(event.request_id) is str and type(event.path) is str and type(event.stream) is bool
            and math.isfinite(event.time) and math.isfinite(event.latency_ms) and 0 <= event.status < _INT32
            and (tokens_in is None or (type(tokens_in) is int and 0 <= tokens_in < _INT32))
            and (tokens_out is None or (type(tokens_out) is int and 0 <= tokens_out < _INT32))
            and (characters is None or (type(characters) is int and 0 <= characters < _INT32))
            and (cost is None or (type(cost) is float and math.isfinite(cost)))
            and (audio is None or (type(audio) is float and math.isfinite(audio)))
            and (ttft is None or (type(ttft) is float and math.isfinite(ttft)))
            and all(v is None or type(v) is str
                    for v in (event.key_id, event.model, event.served_model, event.backend, event.route))):
        return event  # already the row: its fields are the columns, in order
    return _checked_row(event)


def _checked_row(event: UsageEvent) -> tuple[Any, ...]:
    """The event as column values, checked and converted: asyncpg refuses 1 for a boolean, SQLite turns
    NaN into NULL (refused by NOT NULL), and PostgreSQL's INTEGER is 32-bit."""
    return (
        _checked(float, event.time),
        _checked(str, event.request_id),
        _checked(int, event.status),
        _checked(float, event.latency_ms),
        _checked(str, event.path),
        _optional(str, event.key_id),
        _optional(str, event.model),
        _optional(str, event.served_model),
        _optional(str, event.backend),
        _optional(str, event.route),
        _optional(int, event.tokens_in),
        _optional(int, event.tokens_out),
        _optional(float, event.audio_seconds),
        _optional(int, event.characters),
        _optional(float, event.ttft_ms),
        bool(event.stream),
        _optional(float, event.cost),
    )


def _checked(kind: Callable[[Any], T], value: Any) -> T:
    if value is None:
        raise ValueError("a required field is None")
    converted = kind(value)
    if isinstance(converted, float) and not math.isfinite(converted):
        raise ValueError("not a finite number")
    if isinstance(converted, int) and not -_INT32 <= converted < _INT32:
        raise ValueError("outside the 32-bit range")
    return converted


def _optional(kind: Callable[[Any], T], value: Any) -> T | None:
    return None if value is None else _checked(kind, value)
