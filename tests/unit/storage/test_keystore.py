"""The key store: versioned writes in commit order, soft deletes replicas learn of by polling, budget spend."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from synapse_gateway.storage import Database, KeyStore, StoredKey, open_database, open_migrated
from tests.unit.storage.conftest import with_params


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_key_round_trips_and_each_write_bumps_the_version(db: Database) -> None:
    keys = KeyStore(db)
    assert await keys.latest_version() == 0
    first = await keys.put("k1", "sha256:aa", {"name": "ci", "models": ["llama"], "limits": {"rpm": 60}})
    assert (first.id, first.hash, first.version, first.deleted) == ("k1", "sha256:aa", 1, False)
    assert first.data == {"name": "ci", "models": ["llama"], "limits": {"rpm": 60}}
    assert await keys.get("k1") == first
    second = await keys.put("k1", "sha256:bb", {"name": "ci-renamed"})
    assert (second.hash, second.data, second.version) == ("sha256:bb", {"name": "ci-renamed"}, 2)
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    await keys.put("k2", "sha256:cc", {})
    assert [key.id for key in await keys.all()] == ["k1", "k2"]
    assert await keys.latest_version() == 3
    assert await keys.get("nope") is None


async def test_a_deleted_key_is_gone_but_seen_by_changes_since(db: Database) -> None:
    keys = KeyStore(db)
    await keys.put("k1", "h1", {})
    await keys.put("k2", "h2", {})
    seen = await keys.latest_version()
    deleted = await keys.delete("k1")
    assert deleted is not None and deleted.deleted and deleted.version == seen + 1
    assert await keys.get("k1") is None
    assert [key.id for key in await keys.all()] == ["k2"]
    assert [(key.id, key.deleted) for key in await keys.changes_since(seen)] == [("k1", True)]
    assert await keys.delete("k1") is None and await keys.delete("never") is None
    assert await keys.latest_version() == seen + 1  # deleting nothing is no change


async def test_changes_since_lists_every_later_write_in_version_order(db: Database) -> None:
    keys = KeyStore(db)
    for name in ("a", "b", "c"):
        await keys.put(name, "h", {"v": 1})
    await keys.put("a", "h", {"v": 2})
    await keys.delete("b")
    changes = await keys.changes_since(1)
    assert [(key.id, key.version, key.deleted) for key in changes] == [("c", 3, False), ("a", 4, False), ("b", 5, True)]
    assert await keys.changes_since(5) == []


async def test_putting_a_deleted_key_revives_it_as_new(db: Database) -> None:
    keys = KeyStore(db)
    old = await keys.put("k", "h-old", {})
    await keys.delete("k")
    revived = await keys.put("k", "h-new", {"fresh": True})
    assert not revived.deleted and revived.version == 3 and revived.created_at >= old.created_at
    assert await keys.get("k") == revived


async def test_saved_spend_only_ever_grows(db: Database) -> None:
    keys = KeyStore(db)
    await keys.save_spend([("k1", "2026-11", 100, 0.5), ("k1", "2026-11-30", 10, 0.25)])
    # A replica with a stale view saves less tokens but more cost: each column keeps its maximum.
    await keys.save_spend([("k1", "2026-11", 40, 0.75), ("k2", "2026-11", 7, 0.0)])
    assert await keys.load_spend([("k1", "2026-11"), ("k1", "2026-11-30"), ("k2", "2026-11"), ("k2", "2026-10")]) == {
        ("k1", "2026-11"): (100, 0.75),
        ("k1", "2026-11-30"): (10, 0.25),
        ("k2", "2026-11"): (7, 0.0),
    }
    # Only the pairs asked for, even when another pair shares the key or the period.
    assert await keys.load_spend([("k1", "2026-11-30"), ("k2", "2026-10")]) == {("k1", "2026-11-30"): (10, 0.25)}
    await keys.save_spend([])
    assert await keys.load_spend([]) == {}


async def test_spend_for_many_keys_loads_in_chunks(db: Database) -> None:
    keys = KeyStore(db)
    rows = [(f"key-{n:04d}", "2026-11", n, n / 4) for n in range(950)]
    await keys.save_spend(rows)
    loaded = await keys.load_spend((key_id, period) for key_id, period, _, _ in rows)
    assert loaded == {(key_id, period): (tokens, cost) for key_id, period, tokens, cost in rows}


async def test_concurrent_writers_never_hide_a_change_from_a_poller(url: str) -> None:
    """Replicas write keys at once while another polls changes_since(last seen), as replicas do."""
    replicas: list[Database] = [await open_migrated(url)]
    replicas += [await open_database(url) for _ in range(3)]
    poller = KeyStore(replicas[0])
    finished = asyncio.Event()
    seen: dict[str, StoredKey] = {}

    async def write(writer: int) -> None:
        keys = KeyStore(replicas[writer])
        for n in range(25):
            await keys.put(f"w{writer}-{n}", "h", {"n": n})
            if n % 5 == 0:
                await keys.delete(f"w{writer}-{n}")

    async def poll() -> None:
        last = 0
        while True:
            done = finished.is_set()  # read before polling: the last poll starts after every commit
            changes = await poller.changes_since(last)
            versions = [key.version for key in changes]
            assert versions == sorted(versions) and all(version > last for version in versions)
            seen.update((key.id, key) for key in changes)
            last = versions[-1] if versions else last
            if done:
                return
            await asyncio.sleep(0)

    try:
        polling = asyncio.create_task(poll())
        await asyncio.gather(*(write(writer) for writer in (1, 2, 3)))
        finished.set()
        await polling
        assert {key.id: key.deleted for key in seen.values()} == {
            f"w{writer}-{n}": n % 5 == 0 for writer in (1, 2, 3) for n in range(25)
        }
        assert seen == {key.id: key for key in await poller.changes_since(0)}
    finally:
        for db in replicas:
            await db.close()


async def test_a_writer_that_commits_later_gets_a_larger_version(pg_url: str) -> None:
    """Writer A takes a version and is held up before commit; writer B comes later. B must wait for A:
    if B committed first with a larger version, a poll in between would skip A's change for ever."""
    app = f"writers_{uuid.uuid4().hex[:12]}"
    holder = await open_migrated(pg_url)
    writer_a = await open_database(with_params(pg_url, application_name=app))
    writer_b = await open_database(with_params(pg_url, application_name=app))
    poller = KeyStore(holder)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold_row_a() -> None:  # e.g. a slow admin transaction touching key a
        async with holder.transaction() as tx:
            await tx.fetch("SELECT id FROM api_keys WHERE id = ? FOR UPDATE", "a")
            held.set()
            await release.wait()

    async def writers_waiting(count: int) -> bool:
        sql = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = ? AND wait_event_type = 'Lock'"
        return bool(await holder.fetchval(sql, app) == count)

    try:
        await poller.put("a", "h0", {})
        holding = asyncio.create_task(hold_row_a())
        await held.wait()
        last = await poller.latest_version()
        first = asyncio.create_task(KeyStore(writer_a).put("a", "h1", {}))
        await eventually(lambda: writers_waiting(1))
        second = asyncio.create_task(KeyStore(writer_b).put("b", "h2", {}))

        async def second_done_or_waiting() -> bool:
            return second.done() or await writers_waiting(2)

        await eventually(second_done_or_waiting)
        seen = {key.id: key.version for key in await poller.changes_since(last)}
        last = max([last, *seen.values()])
        release.set()
        await holding
        a, b = await asyncio.gather(first, second)
        seen |= {key.id: key.version for key in await poller.changes_since(last)}
        assert seen == {"a": a.version, "b": b.version}
        assert a.version < b.version
    finally:
        release.set()
        for db in (holder, writer_a, writer_b):
            await db.close()


async def test_spend_upserts_from_replicas_at_once_do_not_deadlock(url: str) -> None:
    replicas = [await open_migrated(url), await open_database(url)]
    try:
        rows = [(f"k{n}", "2026-11", n, float(n)) for n in range(50)]
        await asyncio.gather(*(KeyStore(db).save_spend(list(reversed(rows)) if i else rows)
                               for i, db in enumerate(replicas) for _ in range(3)))
        assert len(await KeyStore(replicas[0]).load_spend((k, p) for k, p, _, _ in rows)) == 50
    finally:
        for db in replicas:
            await db.close()
