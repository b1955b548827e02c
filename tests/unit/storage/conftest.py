"""Databases for the storage tests: a SQLite file in tmp_path, and a fresh schema of the real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from synapse_gateway.storage import Database, open_database, open_migrated
from tests.services import require_postgres


def with_params(url: str, **params: str) -> str:
    """The URL with query parameters added (asyncpg passes unknown ones on as server settings)."""
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


@asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    """A URL whose search_path is a schema of its own, dropped afterwards: tests never see each other's tables."""
    base = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = await open_database(base)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield with_params(base, search_path=schema)
        finally:
            await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with pg_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/data/synapse.db"


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test that takes it runs once per dialect."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/synapse.db"
    else:
        async with pg_schema() as schema_url:
            yield schema_url


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    """A migrated database of each dialect."""
    database = await open_migrated(url)
    try:
        yield database
    finally:
        await database.close()
