"""Migrations: applied once each, in order, recorded; replicas starting together on PostgreSQL don't collide."""

from __future__ import annotations

import asyncio

import pytest

from synapse_gateway.storage import MIGRATIONS, Queries, StorageError, migrate, open_database


async def test_migrations_apply_once_and_are_recorded(url: str) -> None:
    db = await open_database(url)
    try:
        assert await migrate(db) == [migration.__name__ for migration in MIGRATIONS]
        assert await migrate(db) == []
        rows = await db.fetch("SELECT name, applied_at FROM schema_migrations ORDER BY name")
        assert [row["name"] for row in rows] == ["m001_initial"]
        for table in ("api_keys", "budget_spend", "usage_events"):
            assert await db.fetchval(f"SELECT COUNT(*) FROM {table}") == 0
    finally:
        await db.close()


async def test_a_new_migration_runs_after_the_applied_ones(url: str) -> None:
    ran: list[str] = []

    async def m002_add_note(db: Queries) -> None:
        ran.append("m002")
        await db.execute("ALTER TABLE api_keys ADD COLUMN note TEXT")

    db = await open_database(url)
    try:
        await migrate(db)
        assert await migrate(db, (*MIGRATIONS, m002_add_note)) == ["m002_add_note"]
        assert await migrate(db, (*MIGRATIONS, m002_add_note)) == []
        assert ran == ["m002"]
        assert await db.fetch("SELECT note FROM api_keys") == []
    finally:
        await db.close()


async def test_a_failing_migration_leaves_nothing_half_done(url: str) -> None:
    async def m002_broken(db: Queries) -> None:
        await db.execute("CREATE TABLE half_done (x INTEGER)")
        await db.execute("THIS IS NOT SQL")

    db = await open_database(url)
    try:
        with pytest.raises(StorageError):
            await migrate(db, (*MIGRATIONS, m002_broken))
        with pytest.raises(StorageError, match="half_done"):
            await db.fetch("SELECT x FROM half_done")
        # m001 was rolled back with it: the next start applies it again, whole.
        assert await migrate(db) == ["m001_initial"]
        assert await db.fetch("SELECT name FROM schema_migrations") == [{"name": "m001_initial"}]
    finally:
        await db.close()


async def test_replicas_migrating_at_once_on_postgresql_both_succeed(pg_url: str) -> None:
    replicas = [await open_database(pg_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(db) for db in replicas))
        assert sorted(results) == [[], [], [], ["m001_initial"]]
        assert await replicas[0].fetchval("SELECT COUNT(*) FROM schema_migrations") == 1
    finally:
        for db in replicas:
            await db.close()


async def test_replicas_migrating_at_once_on_sqlite_both_succeed(sqlite_url: str) -> None:
    replicas = [await open_database(sqlite_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(db) for db in replicas))
        assert sorted(results) == [[], [], ["m001_initial"]]
    finally:
        for db in replicas:
            await db.close()
