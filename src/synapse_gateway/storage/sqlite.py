"""SQLite behind the Database seam: one connection on one worker thread, so the event loop never waits on disk."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from .database import Queries, StorageError, StorageUnavailable

T = TypeVar("T")

# Primary result codes after which this connection is no good and a fresh one may work.
_BROKEN_CODES = frozenset({sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_NOTADB})


class SqliteDatabase:
    """A SQLite file in WAL mode. Statements run one at a time on a dedicated thread; a transaction holds
    the connection (other callers wait on an asyncio lock, not on a thread) until it commits."""

    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, path: str, executor: ThreadPoolExecutor, connection: sqlite3.Connection) -> None:
        self._where = f"SQLite database {path}"
        self._executor, self._connection = executor, connection
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: str, *, busy_timeout: float = 5.0) -> SqliteDatabase:
        """Open (creating the file and its folders) on a new worker thread."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synapse-sqlite")
        future = asyncio.get_running_loop().run_in_executor(executor, _connect, path, busy_timeout)
        try:
            connection = await _mapped(f"SQLite database {path}", future)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, connection)

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue work on the connection's thread now (not when a task first runs), keeping statement order."""
        if self._closed:
            raise StorageUnavailable(f"{self._where} is closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, self._connection, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await _mapped(self._where, self._submit(fn, *args))

    async def execute(self, sql: str, *args: Any) -> None:
        async with self._lock:
            await self._call(_execute, sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._lock:
            await self._call(_executemany_atomically, sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self._lock:
            return await self._call(_fetch, sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._lock:
            return await self._call(_fetchval, sql, args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        async with self._lock:
            try:
                # IMMEDIATE takes the write lock up front: two processes never both read, then fail to upgrade.
                # Inside the try: a caller cancelled while BEGIN waits on the lock still gets its rollback.
                await self._call(_execute, "BEGIN IMMEDIATE", ())
                yield _Transaction(self)
                await self._call(_execute, "COMMIT", ())
            except BaseException:
                if not self._closed:
                    # Queued before the lock is released, so it runs before any later statement; not awaited,
                    # so a cancelled caller returns now (the BEGIN it was waiting on may still be in progress).
                    self._submit(_rollback).add_done_callback(_consume)
                raise

    async def close(self) -> None:
        """Close the connection once the statement or transaction in progress is done, and end the thread."""
        async with self._lock:
            if self._closed:
                return
            future = self._submit(sqlite3.Connection.close)
            self._closed = True
        self._executor.shutdown(wait=False)
        with contextlib.suppress(StorageError):
            await _mapped(self._where, future)


class _Transaction:
    """The statements of one open transaction: they run without the lock the transaction already holds."""

    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database

    async def execute(self, sql: str, *args: Any) -> None:
        await self._database._call(_execute, sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._database._call(_executemany, sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self._database._call(_fetch, sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._database._call(_fetchval, sql, args)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a rollback's outcome nobody awaits (asyncio would log it); if it failed, the next BEGIN says so."""
    if not future.cancelled():
        future.exception()


async def _mapped(where: str, future: asyncio.Future[T]) -> T:
    """The one place where sqlite3's (and the file system's) exceptions become StorageError."""
    try:
        return await future
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        kind = StorageUnavailable if code in _BROKEN_CODES else StorageError
        raise kind(f"{where}: {exc}") from exc
    except OSError as exc:
        raise StorageUnavailable(f"cannot open {where}: {exc}") from exc


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; this module opens and ends them itself.
    connection = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        connection.close()
        raise
    return connection


def _execute(connection: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> None:
    connection.execute(sql, args).close()


def _executemany(connection: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    connection.executemany(sql, rows).close()


def _executemany_atomically(connection: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """All rows or none, and one commit (one fsync) for the lot rather than one per row."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.executemany(sql, rows).close()
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)
        raise


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        connection.execute("ROLLBACK")


def _fetch(connection: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    cursor = connection.execute(sql, args)
    try:
        if cursor.description is None:
            return []
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        cursor.close()


def _fetchval(connection: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Any:
    cursor = connection.execute(sql, args)
    try:
        row = cursor.fetchone()
        return None if row is None else row[0]
    finally:
        cursor.close()
