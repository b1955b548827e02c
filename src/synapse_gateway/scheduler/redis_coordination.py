"""Coordination of gateway replicas through one Redis: fenced leases, the shared table, in-flight counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .coordination import (
    CoordinationError,
    CoordinatorUnavailable,
    Lease,
    LeaseTimeout,
    StaleToken,
)

log = logging.getLogger("synapse.coordination")

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[3])) .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# A token is current iff it is some device's newest: tokens come from one counter, so they never repeat.
_FENCE = """
local current = false
for _, newest in ipairs(redis.call('HVALS', KEYS[2])) do current = current or newest == ARGV[4] end
if not current then return 0 end
"""
_LIVE = """
local live, flat = {}, redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local cut = string.find(flat[i + 1], '|', 1, true)
  if tonumber(string.sub(flat[i + 1], 1, cut - 1)) > now then
    table.insert(live, flat[i]); table.insert(live, string.sub(flat[i + 1], cut + 1))
  else redis.call('HDEL', KEYS[1], flat[i]) end
end
return live
"""
# Tokens never repeat, even after a Redis restart without persistence resets the counter: a token is
# at least the Redis clock in microseconds, so a fresh counter starts above every token handed out.
_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local token = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
if token < floor then
  token = floor
  redis.call('SET', KEYS[2], string.format('%.0f', token))
end
redis.call('HSET', KEYS[3], ARGV[3], string.format('%.0f', token))
return token
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class RedisCoordinator:
    """Coordinates replicas through one Redis: leases, fencing tokens, residency table, in-flight counts."""

    def __init__(
        self,
        url: str,
        *,
        replica: str,
        lease_ttl: float = 15.0,
        prefix: str = "synapse",
        acquire_timeout: float = 60.0,
        record_ttl: float = 600.0,
        in_flight_ttl: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        password = urlsplit(url).password  # name the URL in errors without leaking the password into logs
        self._where = url.replace(f":{password}@", ":***@", 1) if password else url
        self._replica, self._prefix = replica, prefix
        self._lease_ttl, self._acquire_timeout = lease_ttl, acquire_timeout
        self._ttl = max(1, int(lease_ttl * 1000))  # milliseconds, as PX and PEXPIRE take them
        self._record_ms, self._in_flight_ms = int(record_ttl * 1000), int(in_flight_ttl * 1000)
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5)
        scripts = {"put": _NOW + _PUT, "fenced_put": _FENCE + _NOW + _PUT, "live": _NOW + _LIVE}
        scripts |= {"acquire": _ACQUIRE, "renew": _RENEW, "release": _RELEASE}
        self._scripts = {name: self._redis.register_script(text) for name, text in scripts.items()}
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = asyncio.Lock()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._close_timeout = close_timeout

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def _run(self, script: str, keys: list[str], *args: str | int) -> Any:
        """Map Redis failures to this module's errors in one place, so callers catch one tree."""
        try:
            return await self._scripts[script](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise CoordinatorUnavailable(f"Redis at {self._where} failed: {exc}") from exc

    async def connect(self) -> None:
        """Fail at start-up, naming the URL, rather than at the first lifecycle action."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            await self._redis.aclose()
            raise CoordinatorUnavailable(
                f"cannot reach Redis at {self._where} ({exc}); start Redis there, fix the URL, "
                "or drop the Redis URL to run a single replica in memory"
            ) from exc
        self._heartbeat = asyncio.create_task(self._keep_in_flight_alive())

    async def close(self) -> None:
        """Stop the heartbeat, withdraw this replica's in-flight counts, close the pool; bounded, and idempotent.

        The heartbeat stops on an event rather than by cancellation: on Python 3.11, `asyncio.wait_for`
        (which redis-py uses to send each command under `socket_timeout`) drops a cancellation that
        arrives as the send completes, and the heartbeat then slept on, leaving `close` waiting for ever.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._heartbeat is not None and not await _finished(self._heartbeat, self._close_timeout):
            log.warning("the in-flight heartbeat did not stop within %gs; cancelling it", self._close_timeout)
            self._heartbeat.cancel()
            if not await _finished(self._heartbeat, self._close_timeout):
                log.error("the in-flight heartbeat ignored its cancellation; leaving it behind")
        withdrawn = list(self._in_flight)
        try:
            async with asyncio.timeout(self._close_timeout):
                for unit in withdrawn:
                    await self.report_in_flight(unit, 0)
        except (CoordinationError, TimeoutError) as exc:  # the counts expire on their own after in_flight_ttl
            log.warning("withdrawing in-flight counts failed: %s", exc or "timed out")
        await self._redis.aclose()

    @asynccontextmanager
    async def lease(self, device: str) -> AsyncIterator[Lease]:
        """Hold the device exclusively across replicas, renewing until the block exits."""
        owner = f"{self._replica}:{uuid.uuid4().hex}"
        lease = await self._acquire(device, owner)
        renewer = asyncio.create_task(self._renew(lease, owner))
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._release(device, owner)

    async def _acquire(self, device: str, owner: str) -> Lease:
        """Poll with jittered backoff: SET NX has no queue, and jitter keeps replicas from colliding."""
        keys = [self._key("lease", device), self._key("fence", "counter"), self._key("fence", "newest")]
        deadline, delay = time.monotonic() + self._acquire_timeout, 0.005
        while True:
            sent = time.monotonic()
            token = int(await self._run("acquire", keys, owner, self._ttl, device))
            if token:
                return Lease(device, token, expires_at=sent + self._lease_ttl)
            if time.monotonic() + delay > deadline:
                waited = f"device {device!r} stayed leased by another replica for {self._acquire_timeout:g}s"
                raise LeaseTimeout(f"{waited}; a wake or sleep there is stuck, or acquire_timeout is too short")
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 0.1, self._lease_ttl / 3)

    async def _renew(self, lease: Lease, owner: str) -> None:
        """Extend only while still the owner; flag the lease lost as soon as ownership can't be proven."""
        try:
            while True:
                await asyncio.sleep(self._lease_ttl / 3)
                sent = time.monotonic()
                try:
                    if not await self._run("renew", [self._key("lease", lease.device)], owner, self._ttl):
                        break
                    lease.expires_at = sent + self._lease_ttl
                except CoordinatorUnavailable as exc:  # a blip is survivable until the last proven expiry
                    log.warning("renewing the lease on device %r failed: %s", lease.device, exc)
                    if time.monotonic() >= lease.expires_at:
                        break
        except Exception:  # a renewer that died unseen would let the lease lapse while we act
            log.exception("renewing the lease on device %r failed unexpectedly", lease.device)
        lease.lost.set()

    async def _release(self, device: str, owner: str) -> None:
        """Delete the lease only if still ours; if Redis is unreachable it simply expires after the ttl."""
        try:
            await self._run("release", [self._key("lease", device)], owner)
        except CoordinatorUnavailable as exc:
            log.warning("releasing the lease on device %r failed (it expires on its own): %s", device, exc)

    async def publish(self, unit: str, state: dict[str, Any], token: int) -> None:
        """Write atomically against the fence so a replica that lost its lease can't overwrite the table."""
        keys = [self._key("table"), self._key("fence", "newest")]
        if not await self._run("fenced_put", keys, unit, json.dumps(state), self._record_ms, str(token)):
            raise StaleToken(unit, token)

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        """Read every unexpired record; records nobody refreshed age out as unknown."""
        flat = await self._run("live", [self._key("table")])
        return {flat[i]: json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def report_in_flight(self, unit: str, count: int) -> None:
        """Share this replica's count; a heartbeat keeps non-zero counts alive, so a dead replica's expire."""
        async with self._in_flight_lock:  # one writer at a time, so a refresh can't land after a newer count
            if count:
                self._in_flight[unit] = count
            else:
                self._in_flight.pop(unit, None)
            await self._put_in_flight(unit, count)

    async def _put_in_flight(self, unit: str, count: int) -> None:
        await self._run("put", [self._key("inflight", unit)], self._replica, count, self._in_flight_ms)

    async def in_flight_elsewhere(self, unit: str) -> int:
        """Sum the live counts of other replicas, so eviction never pulls a unit from under them."""
        flat = await self._run("live", [self._key("inflight", unit)])
        return sum(int(flat[i + 1]) for i in range(0, len(flat), 2) if flat[i] != self._replica)

    async def _keep_in_flight_alive(self) -> None:
        """Refresh counts well inside their TTL until `close`; a failed round is retried on the next tick."""
        while not await _stopped_within(self._stopping, self._in_flight_ms / 3000):
            try:
                async with self._in_flight_lock:
                    for unit, count in list(self._in_flight.items()):
                        await self._put_in_flight(unit, count)
            except CoordinatorUnavailable as exc:
                log.warning("refreshing in-flight counts failed: %s", exc)


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stopping`; whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
    return stopping.is_set()


async def _finished(task: asyncio.Task[None], seconds: float) -> bool:
    """Wait up to `seconds` for `task` to end (never raising what it raised); whether it has."""
    await asyncio.wait({task}, timeout=seconds)
    if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("the in-flight heartbeat had failed: %s", exc)
    return task.done()
