"""Usage reports: requests, errors, tokens, cost and latency from usage_events, grouped as asked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from .database import Dialect, Queries

Grouping = Literal["key", "model", "day", "backend"]

# Output field per grouping, in sort order: day, then key, then model, then backend.
_FIELDS: tuple[tuple[Grouping, str], ...] = (
    ("day", "day"), ("key", "key_id"), ("model", "model"), ("backend", "backend"),
)
_TOTALS = """
    COUNT(*) AS requests,
    SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,
    SUM(tokens_in) AS tokens_in,
    SUM(tokens_out) AS tokens_out,
    SUM(cost) AS cost,
    SUM(audio_seconds) AS audio_seconds,
    SUM(characters) AS characters,
    AVG(latency_ms) AS avg_latency_ms
"""


async def usage_report(
    db: Queries,
    *,
    since: float | None,
    until: float | None,
    group_by: Sequence[Grouping],
    key_id: str | None = None,
) -> list[dict[str, Any]]:
    """One row per group of requests with `since <= time < until` (unix seconds; None: unbounded).

    Groups: "key" (field `key_id`; requests without a key show as None), "model" (as the client asked),
    "day" (`YYYY-MM-DD`, UTC), "backend". Rows are sorted by day, key, model, backend, None first; sums
    over no values are 0 and avg_latency_ms is a float. No group_by: one row of totals (none if no requests)."""
    unknown = set(group_by) - {grouping for grouping, _ in _FIELDS}
    if unknown:
        raise ValueError(f"cannot group usage by {sorted(unknown)}: use any of {[g for g, _ in _FIELDS]}")
    fields = [field for grouping, field in _FIELDS if grouping in group_by]
    columns = [f"{_expression(field, db.dialect)} AS {field}" for field in fields]
    where, args = _filters(since, until, key_id)
    sql = f"SELECT {', '.join([*columns, _TOTALS])} FROM usage_events{where}"
    if fields:
        sql += " GROUP BY " + ", ".join(str(position) for position in range(1, len(fields) + 1))
    rows = [_normalised(row, fields) for row in await db.fetch(sql, *args) if row["requests"]]
    # Sorted here, not in SQL: the dialects disagree on where NULLs go and on how text collates.
    rows.sort(key=lambda row: tuple((row[field] is not None, row[field] or "") for field in fields))
    return rows


def _expression(field: str, dialect: Dialect) -> str:
    if field != "day":
        return field
    if dialect == "sqlite":
        return "strftime('%Y-%m-%d', time, 'unixepoch')"
    return "to_char(to_timestamp(time) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def _filters(since: float | None, until: float | None, key_id: str | None) -> tuple[str, list[Any]]:
    conditions: list[str] = []
    args: list[Any] = []
    if since is not None:
        conditions.append("time >= ?")
        args.append(float(since))
    if until is not None:
        conditions.append("time < ?")
        args.append(float(until))
    if key_id is not None:
        conditions.append("key_id = ?")
        args.append(key_id)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), args


def _normalised(row: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """The same Python types from both dialects (PostgreSQL's sums may come back as Decimal)."""
    return {
        **{field: row[field] for field in fields},
        "requests": int(row["requests"]),
        "errors": int(row["errors"] or 0),
        "tokens_in": int(row["tokens_in"] or 0),
        "tokens_out": int(row["tokens_out"] or 0),
        "cost": float(row["cost"] or 0.0),
        "audio_seconds": float(row["audio_seconds"] or 0.0),
        "characters": int(row["characters"] or 0),
        "avg_latency_ms": float(row["avg_latency_ms"]),
    }
