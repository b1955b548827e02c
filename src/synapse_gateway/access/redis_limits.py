"""Per-key limits shared by every replica through one Redis, each operation one Lua script on the Redis clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .limits import (
    BUSY_RETRY,
    EPSILON,
    FOREVER,
    PERIOD_RETENTION,
    WINDOW,
    Grant,
    LimitExceeded,
    Limits,
    MemoryLimiter,
    Reason,
    Usage,
    ticket_source,
)

log = logging.getLogger("synapse.limits")
T = TypeVar("T")

_WINDOW_US = int(WINDOW * 1_000_000)

# Per key, all under one hash tag: `win` zset ticket -> grant time (µs); `tok` hash ticket -> tokens, plus `sum`;
# `live` zset ticket -> lease expiry (µs); `res` hash ticket -> "tokens|cost|period", plus per period the sums
# `t|<period>`, `c|<period>` and the count `n|<period>`; `spend:<period>` hash tokens, cost (settled only).
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(x) return string.format('%.0f', x) end
local function extend(key, ms) if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, int(ms)) end end
local function expire(key, at)
  if at == '' then redis.call('PERSIST', key) else redis.call('EXPIREAT', key, at) end
end
local function unreserve(res, ticket)
  local rec = redis.call('HGET', res, ticket)
  if not rec then return end
  redis.call('HDEL', res, ticket)
  local a = string.find(rec, '|', 1, true)
  local b = string.find(rec, '|', a + 1, true)
  local period, cost = string.sub(rec, b + 1), string.sub(rec, a + 1, b - 1)
  if redis.call('HINCRBY', res, 'n|' .. period, -1) <= 0 then  -- back to exact zero: no float drift survives
    redis.call('HDEL', res, 'n|' .. period, 't|' .. period, 'c|' .. period)
  else
    redis.call('HINCRBY', res, 't|' .. period, int(0 - tonumber(string.sub(rec, 1, a - 1))))
    redis.call('HINCRBYFLOAT', res, 'c|' .. period, '-' .. cost)
  end
end
"""
_ACQUIRE = """
local ticket, period, period_end = ARGV[1], ARGV[7], tonumber(ARGV[8])
local rpm, tpm, par = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tbud, mbud = tonumber(ARGV[5]), tonumber(ARGV[6])
local want_t, want_c, lease, window = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local eps, busy, forever = tonumber(ARGV[13]), tonumber(ARGV[14]) * 1000000, tonumber(ARGV[15]) * 1000000
local n, used, held = 0, 0, 0
local res_t, res_c = 0, 0
if rpm or tpm then
  while true do  -- age out the window in bounded batches (unpack has a stack limit)
    local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now - window), 'LIMIT', 0, 500)
    if #old == 0 then break end
    local toks, freed = redis.call('HMGET', KEYS[2], unpack(old)), 0
    for i = 1, #old do freed = freed + tonumber(toks[i] or '0') end
    redis.call('HDEL', KEYS[2], unpack(old))
    if freed ~= 0 then redis.call('HINCRBY', KEYS[2], 'sum', int(0 - freed)) end
    redis.call('ZREM', KEYS[1], unpack(old))
  end
  n, used = redis.call('ZCARD', KEYS[1]), tonumber(redis.call('HGET', KEYS[2], 'sum') or '0')
end
if par or tbud or mbud then
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', int(now))) do unreserve(KEYS[4], dead) end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', int(now))
  held = redis.call('ZCARD', KEYS[3])
  local r = redis.call('HMGET', KEYS[4], 't|' .. period, 'c|' .. period)
  res_t, res_c = tonumber(r[1] or '0'), tonumber(r[2] or '0')
end
local s = redis.call('HMGET', KEYS[5], 'tokens', 'cost')
local spent_t, spent_c = tonumber(s[1] or '0'), tonumber(s[2] or '0')
local worst = nil
local function refuse(permanent, wait, reason, kind)
  if not worst or (permanent and not worst[1]) or (permanent == worst[1] and wait > worst[2]) then
    worst = {permanent, wait, reason, kind}
  end
end
if rpm and n >= rpm then
  local e = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
  refuse(false, e[2] and (tonumber(e[2]) + window - now) or window, 'rpm', '')
end
if tpm and used + want_t > tpm then
  if want_t > tpm then refuse(true, window, 'tpm', '') else
    local excess, wait, start = used + want_t - tpm, window, 0
    while excess > 0 do
      local batch = redis.call('ZRANGE', KEYS[1], start, start + 255, 'WITHSCORES')
      if #batch == 0 then break end
      local tickets = {}
      for i = 1, #batch, 2 do tickets[#tickets + 1] = batch[i] end
      local toks = redis.call('HMGET', KEYS[2], unpack(tickets))
      for i = 1, #tickets do
        excess = excess - tonumber(toks[i] or '0')
        if excess <= 0 then wait = tonumber(batch[2 * i]) + window - now break end
      end
      start = start + 256
    end
    refuse(false, wait, 'tpm', '')
  end
end
if par and held >= par then refuse(false, busy, 'parallel', '') end
local function budget(limit, spent, reserved, want, kind)
  if not limit or spent + reserved + want <= limit + eps then return end
  if want > limit + eps or (not period_end and spent + want > limit + eps) then
    refuse(true, forever, 'budget', kind)
  elseif spent + want > limit + eps then  -- only a new period makes room
    refuse(false, math.max(period_end * 1000000 - now, 1000), 'budget', kind)
  else refuse(false, busy, 'budget', kind) end  -- only reservations of requests in flight are in the way
end
if par or tbud or mbud then
  budget(tbud, spent_t, res_t, want_t, 'tokens')
  budget(mbud, spent_c, res_c, want_c, 'money')
end
local rem_r, rem_t = rpm and math.max(0, rpm - n) or false, tpm and math.max(0, tpm - used) or false
if worst then
  return {0, worst[3], tostring(worst[2]), rem_r, rem_t, worst[1] and 1 or 0, worst[4], s[1] or '0', s[2] or '0'}
end
if rpm or tpm then
  redis.call('ZADD', KEYS[1], int(now), ticket)
  redis.call('PEXPIRE', KEYS[1], int(window / 1000 + 1000))
  if tpm then
    redis.call('HSET', KEYS[2], ticket, ARGV[9])
    redis.call('HINCRBY', KEYS[2], 'sum', ARGV[9])
    redis.call('PEXPIRE', KEYS[2], int(window / 1000 + 1000))
  end
end
if par or tbud or mbud then
  redis.call('ZADD', KEYS[3], int(now + lease), ticket)
  redis.call('HSET', KEYS[4], ticket, ARGV[9] .. '|' .. ARGV[10] .. '|' .. period)
  redis.call('HINCRBY', KEYS[4], 'n|' .. period, 1)
  redis.call('HINCRBY', KEYS[4], 't|' .. period, ARGV[9])
  redis.call('HINCRBYFLOAT', KEYS[4], 'c|' .. period, ARGV[10])
  extend(KEYS[3], 2 * lease / 1000)
  extend(KEYS[4], 2 * lease / 1000)
end
return {1, rpm and (rpm - n - 1) or false, tpm and (tpm - used - want_t) or false, s[1] or '0', s[2] or '0'}
"""
_SETTLE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then unreserve(KEYS[3], ARGV[1]) end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cur ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'sum', int(tonumber(ARGV[2]) - tonumber(cur)))
end
if tonumber(ARGV[2]) ~= 0 then redis.call('HINCRBY', KEYS[4], 'tokens', ARGV[2]) end
if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[4], 'cost', ARGV[3]) end
expire(KEYS[4], ARGV[4])
local s = redis.call('HMGET', KEYS[4], 'tokens', 'cost')
return {s[1] or '0', s[2] or '0'}
"""
_SEED = """
local s = redis.call('HMGET', KEYS[1], 'tokens', 'cost')
if tonumber(s[1] or '0') < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'tokens', ARGV[1]) end
if tonumber(s[2] or '0') < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'cost', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('EXPIREAT', KEYS[1], ARGV[3]) end  -- else the first settle sets it
return 1
"""
_REFRESH = """
local at, args = int(now + tonumber(ARGV[1])), {}
for i = 2, #ARGV do
  args[#args + 1] = at
  args[#args + 1] = ARGV[i]
  if #args >= 1000 or i == #ARGV then redis.call('ZADD', KEYS[1], 'XX', unpack(args)) args = {} end
end
extend(KEYS[1], 2 * tonumber(ARGV[1]) / 1000)
extend(KEYS[2], 2 * tonumber(ARGV[1]) / 1000)
return 1
"""


class RedisLimiter:
    """Limits every replica enforces together; while Redis is unreachable, each replica limits on its own."""

    def __init__(
        self, url: str, *, prefix: str = "synapse", lease: float = 60.0, timeout: float = 0.5, recheck: float = 2.0
    ) -> None:
        """`lease`: how long a dead replica's grants hold; `recheck`: how long an outage skips Redis."""
        password = urlsplit(url).password  # name the URL in logs without leaking the password
        self._where = url.replace(f":{password}@", ":***@", 1) if password else url
        self._prefix, self._lease, self._recheck = prefix, lease, recheck
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=2 * timeout,
            retry=Retry(NoBackoff(), 0),  # a retried script could run twice: count a request twice
        )
        scripts = {"acquire": _ACQUIRE, "settle": _SETTLE, "seed": _SEED, "refresh": _REFRESH}
        self._scripts = {name: self._redis.register_script(_COMMON + text) for name, text in scripts.items()}
        self._constants = (repr(EPSILON), repr(BUSY_RETRY), repr(FOREVER))
        self._fallback = MemoryLimiter()
        self._ticket = ticket_source()
        self._live: dict[str, Grant] = {}  # granted through Redis, not yet settled
        self._abandoned: set[asyncio.Task[Any]] = set()  # grants whose requester left, being given back
        self._known: dict[str, tuple[str, Usage]] = {}  # last settled spend Redis reported, per key: (period, spend)
        self._owed: dict[tuple[str, str], tuple[Usage, float | None]] = {}  # settled while Redis was away
        self._down_until: float | None = None  # monotonic time before which Redis is not tried; None: up
        self._stopping = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and start refreshing leases; Redis being down is logged, not fatal."""
        await self._edge(self._redis.ping)
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stop the refresher, hand back spend settled during an outage if Redis is back, close the client."""
        self._stopping.set()
        if self._refresher is not None:
            await asyncio.wait({self._refresher}, timeout=5)
            self._refresher.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._pay_owed()
        await self._redis.aclose()

    async def acquire(self, key_id: str, limits: Limits, reserve: Usage, *, now: float | None = None) -> Grant:
        """Check and record atomically in Redis, on its clock; in-process limits while Redis is away."""
        ticket = self._ticket()
        args = (ticket, _arg(limits.rpm), _arg(limits.tpm), _arg(limits.parallel), _arg(limits.token_budget),
                _arg(limits.money_budget), limits.period, _arg(limits.period_end), reserve.tokens,
                repr(float(reserve.cost)), int(self._lease * 1_000_000), _WINDOW_US, *self._constants)
        running = asyncio.ensure_future(self._script("acquire", self._keys(key_id, limits.period), args))
        try:
            reply = await asyncio.shield(running)
        except asyncio.CancelledError:  # the client left while Redis was granting: give back what it grants
            running.add_done_callback(lambda done: self._give_back(done, key_id, limits, ticket, reserve))
            raise
        if reply is None:
            await self._seed_fallback(key_id, limits)
            return await self._fallback.acquire(key_id, limits, reserve, now=now)
        granted = int(reply[0])
        self._known[key_id] = (limits.period, Usage(int(reply[-2]), float(reply[-1])))
        if not granted:
            raise LimitExceeded(
                cast(Reason, reply[1]), limits, retry_after=float(reply[2]) / 1_000_000,
                remaining=(_int(reply[3]), _int(reply[4])), reserve=reserve,
                budget=cast(Literal["tokens", "money", ""], reply[6]), permanent=bool(int(reply[5])),
            )
        grant = Grant(key_id, ticket, limits, reserve, _int(reply[1]), _int(reply[2]))
        self._live[ticket] = grant
        return grant

    def _give_back(self, done: asyncio.Future[Any], key_id: str, limits: Limits, ticket: str, reserve: Usage) -> None:
        """Settle, at nothing used, a grant Redis made for a request that had already gone."""
        if done.cancelled() or done.exception() is not None:
            return
        reply = done.result()
        if reply is None or not int(reply[0]):
            return
        grant = self._live[ticket] = Grant(key_id, ticket, limits, reserve, None, None)
        task = asyncio.ensure_future(self.settle(grant, Usage()))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def settle(self, grant: Grant, used: Usage) -> None:
        """Replace the reservation by what was used and free the slot; never raises, only the first call counts."""
        if grant.ticket not in self._live:  # issued by the fallback (or settled already: it ignores repeats)
            if not grant.settled:
                self._owe(grant, used)
            await self._fallback.settle(grant, used)
            return
        del self._live[grant.ticket]
        grant.settled = True
        try:
            end = grant.limits.period_end
            expire = "" if end is None else int(end + PERIOD_RETENTION)
            args = (grant.ticket, used.tokens, repr(float(used.cost)), expire)
            reply = await self._script("settle", self._keys(grant.key_id, grant.limits.period)[1:], args)
            if reply is None:  # the lease lets the reservation lapse; the spend is paid when Redis is back
                self._owe(grant, used)
            else:
                self._known[grant.key_id] = (grant.limits.period, Usage(int(reply[0]), float(reply[1])))
        except Exception:  # settling runs in cleanup paths, which must not fail on our account
            log.exception("settling a grant of key %s failed", grant.key_id)

    async def spent(self, key_id: str, period: str) -> Usage:
        """Settled spend of the key in that period, as Redis has it (the fallback's view while it is away)."""
        reply = await self._edge(lambda: self._redis.hmget(self._keys(key_id, period)[4], ["tokens", "cost"]))
        if reply is None:
            await self._seed_fallback(key_id, Limits(period=period))
            return await self._fallback.spent(key_id, period)
        return Usage(int(reply[0] or 0), float(reply[1] or 0))

    async def seed(self, key_id: str, period: str, spent: Usage, *, period_end: float | None = None) -> None:
        """Raise the stored settled spend of (key, period) to at least `spent`, field by field."""
        await self._fallback.seed(key_id, period, spent, period_end=period_end)
        expire = "" if period_end is None else int(period_end + PERIOD_RETENTION)
        args = (spent.tokens, repr(float(spent.cost)), expire)
        await self._script("seed", self._keys(key_id, period)[4:], args)

    def settled_spend(self) -> dict[tuple[str, str], Usage]:
        """The latest settled spend Redis reported to this replica per key, merged with what its fallback settled."""
        spend = {(key_id, period): usage for key_id, (period, usage) in self._known.items() if usage != Usage()}
        for pair, usage in self._fallback.settled_spend().items():
            known = spend.get(pair, usage)
            spend[pair] = Usage(max(known.tokens, usage.tokens), max(known.cost, usage.cost))
        return spend

    def _keys(self, key_id: str, period: str) -> list[str]:
        base = f"{self._prefix}:limits:{{{key_id}}}:"  # the hash tag keeps a key's structures on one cluster slot
        return [base + "win", base + "tok", base + "live", base + "res", f"{base}spend:{period}"]

    async def _script(self, name: str, keys: list[str], args: tuple[str | int, ...]) -> Any:
        return await self._edge(lambda: self._scripts[name](keys=keys, args=args))

    async def _edge(self, work: Callable[[], Awaitable[T]]) -> T | None:
        """The one place Redis failures are caught: None means "Redis is away, use the fallback"."""
        if self._down_until is not None and time.monotonic() < self._down_until:
            return None
        try:
            result = await work()
        except ResponseError as exc:  # a script refused its input: a bug to report, not an outage
            log.error("a Redis limits script failed (%s); this request is limited per replica", exc)
            return None
        except (RedisError, OSError) as exc:  # redis-py's ConnectionError, TimeoutError; sockets
            if self._down_until is None:
                log.warning("Redis at %s failed (%s): limits are enforced per replica until it answers again",
                            self._where, exc or type(exc).__name__)
            self._down_until = time.monotonic() + self._recheck
            return None
        if self._down_until is not None:
            self._down_until = None
            log.info("Redis at %s answers again: limits are shared across replicas again", self._where)
        return result

    async def _seed_fallback(self, key_id: str, limits: Limits) -> None:
        """Start the fallback from the spend Redis last reported, so an outage does not reset budgets."""
        known = self._known.get(key_id)
        if known is not None and known[0] == limits.period:
            await self._fallback.seed(key_id, limits.period, known[1], period_end=limits.period_end)

    def _owe(self, grant: Grant, used: Usage) -> None:
        pair = (grant.key_id, grant.limits.period)
        owed = self._owed.get(pair, (Usage(), None))[0]
        self._owed[pair] = (Usage(owed.tokens + used.tokens, owed.cost + used.cost), grant.limits.period_end)

    async def _pay_owed(self) -> None:
        """Add spend settled while Redis was away to Redis, once it answers (an add under an unused ticket)."""
        for (key_id, period), (usage, end) in list(self._owed.items()):
            expire = "" if end is None else int(end + PERIOD_RETENTION)
            args = (self._ticket(), usage.tokens, repr(float(usage.cost)), expire)
            if await self._script("settle", self._keys(key_id, period)[1:], args) is None:
                return
            del self._owed[(key_id, period)]

    async def _refresh_forever(self) -> None:
        """Every lease/3, extend the leases of this replica's live grants, so only a dead replica's lapse."""
        while not await _stopped_within(self._stopping, self._lease / 3):
            try:
                await self._refresh()
                await self._pay_owed()
            except Exception:  # a refresher that died unseen would let every lease lapse
                log.exception("refreshing limit leases failed")

    async def _refresh(self) -> None:
        tickets: dict[str, list[str]] = {}
        for grant in self._live.values():
            if grant.limits.held:
                tickets.setdefault(grant.key_id, []).append(grant.ticket)
        if not tickets:
            return
        lease = int(self._lease * 1_000_000)

        async def run() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id, owned in tickets.items():
                    keys = self._keys(key_id, "")[2:4]
                    await self._scripts["refresh"](keys=keys, args=(lease, *owned), client=pipe)
                await pipe.execute()

        await self._edge(run)


def _arg(value: float | None) -> str:
    return "" if value is None else repr(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


async def _stopped_within(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stopping`; whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
    return stopping.is_set()
