"""The database seam: URL forms, `?` placeholders on both dialects, transactions, errors mapped to StorageError."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from synapse_gateway.storage import Database, StorageError, StorageUnavailable, open_database
from synapse_gateway.storage.postgres import numbered
from synapse_gateway.storage.sqlite import SqliteDatabase


@pytest.mark.parametrize("url", ["mysql://db/x", "sqlite://relative.db", "sqlite:///", "redis://127.0.0.1:6379/0"])
async def test_an_unsupported_url_is_refused_with_the_forms_that_work(url: str) -> None:
    with pytest.raises(StorageError, match=r"sqlite:///relative/path\.db.*postgresql://"):
        await open_database(url)


async def test_a_password_never_appears_in_errors() -> None:
    with pytest.raises(StorageUnavailable) as caught:
        await open_database("postgresql://user:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(caught.value)
    assert "user:***@127.0.0.1:1" in str(caught.value)


async def test_a_relative_sqlite_path_creates_its_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = await open_database("sqlite:///state/nested/synapse.db")
    try:
        await db.execute("CREATE TABLE t (x INTEGER)")
        assert db.dialect == "sqlite"
    finally:
        await db.close()
    assert (tmp_path / "state" / "nested" / "synapse.db").is_file()


async def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    db = await open_database(sqlite_url)
    try:
        assert await db.fetchval("PRAGMA journal_mode") == "wal"
    finally:
        await db.close()


def test_placeholders_are_numbered_outside_quotes() -> None:
    assert numbered("SELECT ? , '?' AS \"a?\", ?, 'it''s ?' WHERE x = ?") == (
        "SELECT $1 , '?' AS \"a?\", $2, 'it''s ?' WHERE x = $3"
    )


async def test_the_same_sql_runs_on_both_dialects(url: str) -> None:
    db = await open_database(url)
    try:
        await db.execute("CREATE TABLE t (name TEXT PRIMARY KEY, n BIGINT NOT NULL, f DOUBLE PRECISION)")
        await db.executemany("INSERT INTO t (name, n, f) VALUES (?, ?, ?)", [("a", 1, 0.5), ("b", 2, None)])
        await db.execute("INSERT INTO t (name, n, f) VALUES (?, ?, ?)", "c?", 3, 1.5)
        assert await db.fetch("SELECT name, n, f FROM t WHERE n >= ? ORDER BY n", 2) == [
            {"name": "b", "n": 2, "f": None},
            {"name": "c?", "n": 3, "f": 1.5},
        ]
        assert await db.fetchval("SELECT COUNT(*) FROM t") == 3
        assert await db.fetchval("SELECT n FROM t WHERE name = ?", "missing") is None
        assert db.dialect == ("sqlite" if url.startswith("sqlite") else "postgresql")
    finally:
        await db.close()


async def test_a_transaction_commits_at_the_end_and_rolls_back_on_error(url: str) -> None:
    db = await open_database(url)
    try:
        await db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        async with db.transaction() as tx:
            await tx.executemany("INSERT INTO t (x) VALUES (?)", [(1,), (2,)])
            assert await tx.fetchval("SELECT COUNT(*) FROM t") == 2
        with pytest.raises(RuntimeError, match="abandon"):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t (x) VALUES (?)", 3)
                raise RuntimeError("abandon")
        with pytest.raises(StorageError):  # a duplicate key fails the whole batch, not half of it
            await db.executemany("INSERT INTO t (x) VALUES (?)", [(4,), (1,)])
        assert await db.fetch("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}]
    finally:
        await db.close()


async def test_a_driver_error_becomes_storage_error(url: str) -> None:
    db = await open_database(url)
    try:
        with pytest.raises(StorageError) as caught:
            await db.fetch("SELECT * FROM no_such_table")
        assert not isinstance(caught.value, StorageUnavailable)
        assert "no_such_table" in str(caught.value)
    finally:
        await db.close()


async def test_a_closed_database_is_unavailable(url: str) -> None:
    db = await open_database(url)
    await db.close()
    with pytest.raises(StorageUnavailable):
        await db.execute("SELECT 1")
    await db.close()  # closing twice is harmless


async def test_an_unreachable_postgresql_fails_fast_as_unavailable() -> None:
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"127\.0\.0\.1:1"):
        await open_database("postgresql://127.0.0.1:1/x")
    assert time.monotonic() - started < 5


async def test_a_cancelled_transaction_leaves_sqlite_usable(sqlite_url: str) -> None:
    db = await open_database(sqlite_url)
    try:
        await db.execute("CREATE TABLE t (x INTEGER)")
        entered = asyncio.Event()

        async def stuck() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t (x) VALUES (1)")
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(stuck())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await db.execute("INSERT INTO t (x) VALUES (2)")
        assert await db.fetch("SELECT x FROM t") == [{"x": 2}]
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def contended(tmp_path: Path, busy_timeout: float) -> AsyncIterator[tuple[Database, sqlite3.Connection]]:
    """A SQLite database with a table `t` whose write lock another connection (another process, as far
    as SQLite knows) holds with BEGIN IMMEDIATE."""
    path = tmp_path / "locked.db"
    db = await SqliteDatabase.open(str(path), busy_timeout=busy_timeout)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await db.execute("CREATE TABLE t (x INTEGER)")
        other.execute("BEGIN IMMEDIATE")
        yield db, other
    finally:
        other.close()
        await db.close()


async def test_sqlite_waiting_on_a_lock_does_not_block_the_event_loop(tmp_path: Path) -> None:
    async with contended(tmp_path, busy_timeout=5.0) as (db, other):
        write = asyncio.create_task(db.execute("INSERT INTO t (x) VALUES (1)"))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not write.done()
        other.execute("COMMIT")
        await asyncio.wait_for(write, 5)
        assert await db.fetchval("SELECT COUNT(*) FROM t") == 1


async def test_a_lock_held_past_the_busy_timeout_is_a_storage_error(tmp_path: Path) -> None:
    async with contended(tmp_path, busy_timeout=0.05) as (db, other):
        with pytest.raises(StorageError, match="locked"):
            await db.execute("INSERT INTO t (x) VALUES (1)")
        other.execute("ROLLBACK")
        await db.execute("INSERT INTO t (x) VALUES (1)")


async def test_a_transaction_cancelled_while_waiting_to_begin_leaves_no_transaction_open(tmp_path: Path) -> None:
    async with contended(tmp_path, busy_timeout=5.0) as (db, other):

        async def write() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t (x) VALUES (1)")

        waiting = asyncio.create_task(write())
        await asyncio.sleep(0.05)  # BEGIN IMMEDIATE is now waiting for the other connection's lock
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        other.execute("COMMIT")  # the BEGIN still queued on the worker thread now gets the lock
        await db.execute("INSERT INTO t (x) VALUES (2)")
        # Committed, so another connection sees it: our connection was not left inside that BEGIN.
        assert other.execute("SELECT x FROM t").fetchall() == [(2,)]


def test_the_postgresql_driver_is_imported_only_when_a_postgresql_url_is_opened() -> None:
    code = "import sys, synapse_gateway.storage; assert 'asyncpg' not in sys.modules, 'asyncpg imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
