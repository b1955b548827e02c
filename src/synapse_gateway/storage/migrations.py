"""Schema migrations as named functions, applied once each, in order, recorded in schema_migrations."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from .database import Database, Queries, open_database

Migration = Callable[[Queries], Awaitable[None]]

# pg_advisory_xact_lock(key1, key2): key1 names this purpose ("SYNM"), key2 the schema being migrated,
# so replicas sharing one schema take turns while tests in separate schemas don't wait on each other.
_LOCK_PURPOSE = 0x53594E4D


async def m001_initial(db: Queries) -> None:
    """API keys (versioned, soft-deleted), budget spend per period, and one usage event per request."""
    event_id = (
        "id INTEGER PRIMARY KEY AUTOINCREMENT"
        if db.dialect == "sqlite"
        else "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    )
    await db.execute("""
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL,
            data TEXT NOT NULL,
            version BIGINT NOT NULL,
            deleted BOOLEAN NOT NULL DEFAULT FALSE,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""")
    # Unique: one version per change is what lets replicas poll "everything after version N".
    await db.execute("CREATE UNIQUE INDEX api_keys_version ON api_keys (version)")
    await db.execute("""
        CREATE TABLE budget_spend (
            key_id TEXT NOT NULL,
            period TEXT NOT NULL,
            tokens BIGINT NOT NULL,
            cost DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (key_id, period)
        )""")
    await db.execute(f"""
        CREATE TABLE usage_events (
            {event_id},
            time DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT,
            model TEXT,
            served_model TEXT,
            backend TEXT,
            route TEXT,
            status INTEGER NOT NULL,
            tokens_in INTEGER,
            tokens_out INTEGER,
            audio_seconds DOUBLE PRECISION,
            characters INTEGER,
            latency_ms DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            stream BOOLEAN NOT NULL,
            cost DOUBLE PRECISION,
            path TEXT NOT NULL
        )""")
    await db.execute("CREATE INDEX usage_events_time ON usage_events (time)")
    await db.execute("CREATE INDEX usage_events_key_time ON usage_events (key_id, time)")


MIGRATIONS: tuple[Migration, ...] = (m001_initial,)


async def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded, in order, in one transaction; return the names applied.

    Safe when replicas start together: PostgreSQL serialises them on an advisory lock held to commit,
    SQLite on its write lock (BEGIN IMMEDIATE); the later one finds everything applied."""
    applied: list[str] = []
    async with db.transaction() as tx:
        if tx.dialect == "postgresql":
            await tx.execute("SELECT pg_advisory_xact_lock(?, hashtext(coalesce(current_schema(), '')))", _LOCK_PURPOSE)
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        done = {row["name"] for row in await tx.fetch("SELECT name FROM schema_migrations")}
        for migration in migrations:
            if migration.__name__ not in done:
                await migration(tx)
                await tx.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", migration.__name__, time.time()
                )
                applied.append(migration.__name__)
    return applied


async def open_migrated(url: str) -> Database:
    """Open the database and bring its schema up to date; closed again if the migrations fail."""
    db = await open_database(url)
    try:
        await migrate(db)
    except BaseException:
        await db.close()
        raise
    return db
