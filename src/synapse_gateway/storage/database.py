"""One small async database seam over SQLite and PostgreSQL, with one error tree for both."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

Dialect = Literal["sqlite", "postgresql"]

ACCEPTED_URLS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "or postgresql://user[:password]@host[:port]/dbname (postgres:// works too)"
)


class StorageError(Exception):
    """A database operation failed; the message names the database (password hidden) and the cause."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or the connection broke: reconnecting may help, retrying the SQL alone won't."""


class Queries(Protocol):
    """What both a database and an open transaction run. SQL uses `?` placeholders on every dialect."""

    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class Database(Queries, Protocol):
    """A connection (pool) to one database; raises only StorageError and its subclasses."""

    def transaction(self) -> AbstractAsyncContextManager[Queries]:
        """Run the block's statements atomically: committed when the block ends, rolled back if it raises."""
        ...

    async def close(self) -> None: ...


def redacted(url: str) -> str:
    """The URL as it may appear in logs and errors: the password replaced by ***."""
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@", 1) if password else url


async def open_database(url: str) -> Database:
    """Open the database a URL names; the PostgreSQL driver is imported only when one is asked for."""
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        from .sqlite import SqliteDatabase

        return await SqliteDatabase.open(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres import PostgresDatabase
        except ImportError as exc:  # asyncpg is an optional extra
            if exc.name != "asyncpg":
                raise
            raise StorageError(
                f"cannot open {redacted(url)}: PostgreSQL needs the asyncpg driver; "
                "install it with `pip install 'synapse-gateway[postgres]'`"
            ) from exc
        return await PostgresDatabase.open(url)
    raise StorageError(f"unsupported database URL {redacted(url)!r}: use {ACCEPTED_URLS}")
