"""PostgreSQL behind the Database seam: a small asyncpg pool; `?` placeholders are numbered for the server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import asyncpg  # type: ignore[import-untyped]

from .database import Queries, StorageError, StorageUnavailable, redacted

# SQLSTATE classes after which this connection is no good and a fresh one may work: connection exception,
# operator intervention (server shutdown, pg_terminate_backend), insufficient resources (too many clients).
_BROKEN_CLASSES = frozenset({"08", "57", "53"})


@contextmanager
def _mapped(where: str) -> Iterator[None]:
    """The one place where asyncpg's (and the network's) exceptions become StorageError."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        kind = StorageUnavailable if sqlstate[:2] in _BROKEN_CLASSES else StorageError
        raise kind(f"{where}: {exc}") from exc
    except (asyncpg.exceptions.InternalClientError, ValueError) as exc:  # stale statement cache, malformed URL
        raise StorageError(f"{where}: {exc}") from exc
    except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:  # closed connection or pool, refused, timed out
        raise StorageUnavailable(f"{where}: {exc or type(exc).__name__}") from exc


def numbered(sql: str) -> str:
    """Turn `?` placeholders into PostgreSQL's `$1..$n`, leaving quoted text and identifiers alone."""
    out: list[str] = []
    count, quote = 0, ""
    for char in sql:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "?":
            count += 1
            out.append(f"${count}")
            continue
        out.append(char)
    return "".join(out)


class _Runner:
    """Statements on an asyncpg pool or on one connection (their query methods have the same signatures)."""

    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, target: Any, where: str) -> None:
        self._target, self._where = target, where

    async def execute(self, sql: str, *args: Any) -> None:
        with _mapped(self._where):
            await self._target.execute(numbered(sql), *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with _mapped(self._where):
            await self._target.executemany(numbered(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with _mapped(self._where):
            return [dict(record) for record in await self._target.fetch(numbered(sql), *args)]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with _mapped(self._where):
            return await self._target.fetchval(numbered(sql), *args)


class PostgresDatabase(_Runner):
    """A small asyncpg pool. asyncpg replaces connections it finds closed; StorageUnavailable says when
    the server itself is gone."""

    def __init__(self, pool: Any, where: str, *, acquire_timeout: float, close_timeout: float) -> None:
        super().__init__(pool, where)
        self._pool = pool
        self._acquire_timeout, self._close_timeout = acquire_timeout, close_timeout

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
    ) -> PostgresDatabase:
        """Connect now (one connection), so a wrong URL or a down server fails here, naming the URL."""
        where = f"PostgreSQL at {redacted(url)}"
        with _mapped(where):
            pool = await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size, timeout=connect_timeout, command_timeout=command_timeout
            )
        return cls(pool, where, acquire_timeout=connect_timeout + command_timeout, close_timeout=connect_timeout)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        with _mapped(self._where):
            async with self._pool.acquire(timeout=self._acquire_timeout) as connection, connection.transaction():
                yield _Runner(connection, self._where)

    async def close(self) -> None:
        """Close gracefully; connections still busy after the close timeout are cut."""
        try:
            with _mapped(self._where):
                await asyncio.wait_for(self._pool.close(), self._close_timeout)
        except StorageError:
            self._pool.terminate()
