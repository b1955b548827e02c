"""API keys and budget spend in the database, versioned so replicas can poll for what changed."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .database import Database, Queries

_COLUMNS = "id, hash, data, version, deleted, created_at, updated_at"
_UPSERT = """
    INSERT INTO api_keys (id, hash, data, version, deleted, created_at, updated_at)
    VALUES (?, ?, ?, ?, FALSE, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        hash = excluded.hash, data = excluded.data, version = excluded.version, deleted = FALSE,
        updated_at = excluded.updated_at,
        created_at = CASE WHEN api_keys.deleted THEN excluded.created_at ELSE api_keys.created_at END
"""
_SPEND_CHUNK = 400  # ids per query, well under SQLite's parameter limit


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One row of api_keys: `data` is the key's settings as JSON-ready values; `hash` is never the secret."""

    id: str
    hash: str
    data: dict[str, Any]
    version: int
    deleted: bool
    created_at: float
    updated_at: float


class KeyStore:
    """Key writes take the next version of one table-wide counter, in commit order, so a replica that
    polls changes_since(last seen) never skips a change committed after its poll."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def put(self, key_id: str, key_hash: str, data: dict[str, Any]) -> StoredKey:
        """Insert or replace a key (reviving a deleted one) under a new version."""
        now = time.time()
        async with self._db.transaction() as tx:
            version = await _next_version(tx)
            await tx.execute(_UPSERT, key_id, key_hash, orjson.dumps(data).decode(), version, now, now)
            return await _one(tx, key_id)

    async def delete(self, key_id: str) -> StoredKey | None:
        """Mark a key deleted under a new version (replicas learn of it by polling); None if there was none."""
        async with self._db.transaction() as tx:
            version = await _next_version(tx)
            if not await tx.fetch("SELECT id FROM api_keys WHERE id = ? AND NOT deleted", key_id):
                return None
            await tx.execute(
                "UPDATE api_keys SET deleted = TRUE, version = ?, updated_at = ? WHERE id = ?",
                version, time.time(), key_id,
            )
            return await _one(tx, key_id)

    async def get(self, key_id: str) -> StoredKey | None:
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ? AND NOT deleted", key_id)
        return _stored(rows[0]) if rows else None

    async def all(self) -> list[StoredKey]:
        """Every live key, oldest version first."""
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE NOT deleted ORDER BY version")
        return [_stored(row) for row in rows]

    async def changes_since(self, version: int) -> list[StoredKey]:
        """Keys written after `version`, deleted ones included, in version order."""
        rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE version > ? ORDER BY version", version)
        return [_stored(row) for row in rows]

    async def latest_version(self) -> int:
        return int(await self._db.fetchval("SELECT COALESCE(MAX(version), 0) FROM api_keys"))

    async def save_spend(self, rows: Sequence[tuple[str, str, int, float]]) -> None:
        """Upsert (key_id, period, tokens, cost), keeping the larger of stored and given: a replica with a
        stale view never lowers what another one saved."""
        if not rows:
            return
        greatest = "MAX" if self._db.dialect == "sqlite" else "GREATEST"
        sql = f"""
            INSERT INTO budget_spend (key_id, period, tokens, cost, updated_at) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (key_id, period) DO UPDATE SET
                tokens = {greatest}(budget_spend.tokens, excluded.tokens),
                cost = {greatest}(budget_spend.cost, excluded.cost),
                updated_at = excluded.updated_at
        """
        now = time.time()
        # One lock order for every replica (sorted), so two concurrent saves cannot deadlock on PostgreSQL.
        values = sorted((key_id, period, int(tokens), float(cost), now) for key_id, period, tokens, cost in rows)
        async with self._db.transaction() as tx:
            await tx.executemany(sql, values)

    async def load_spend(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, float]]:
        """Stored (tokens, cost) for each (key_id, period) asked for that has any."""
        wanted = set(keys)
        key_ids = sorted({key_id for key_id, _ in wanted})
        periods = sorted({period for _, period in wanted})
        found: dict[tuple[str, str], tuple[int, float]] = {}
        for start in range(0, len(key_ids), _SPEND_CHUNK):
            chunk = key_ids[start:start + _SPEND_CHUNK]
            rows = await self._db.fetch(
                f"SELECT key_id, period, tokens, cost FROM budget_spend "
                f"WHERE key_id IN ({_marks(len(chunk))}) AND period IN ({_marks(len(periods))})",
                *chunk, *periods,
            )
            for row in rows:
                if (row["key_id"], row["period"]) in wanted:
                    found[(row["key_id"], row["period"])] = (int(row["tokens"]), float(row["cost"]))
        return found


async def _next_version(tx: Queries) -> int:
    """The next version, taken so that writers commit in version order.

    PostgreSQL: SHARE ROW EXCLUSIVE conflicts with itself (and with plain writes), so key writers take
    turns from here to commit while readers go on. SQLite: the transaction began IMMEDIATE, which already
    holds the database's only write lock."""
    if tx.dialect == "postgresql":
        await tx.execute("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
    return int(await tx.fetchval("SELECT COALESCE(MAX(version), 0) + 1 FROM api_keys"))


async def _one(tx: Queries, key_id: str) -> StoredKey:
    return _stored((await tx.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", key_id))[0])


def _stored(row: dict[str, Any]) -> StoredKey:
    return StoredKey(
        id=row["id"],
        hash=row["hash"],
        data=orjson.loads(row["data"]),
        version=int(row["version"]),
        deleted=bool(row["deleted"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _marks(count: int) -> str:
    return ", ".join("?" * count)
