"""Per-key limits (request and token rates, requests in flight, token and money budgets) and the in-process limiter."""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

log = logging.getLogger("synapse.limits")

Reason = Literal["rpm", "tpm", "parallel", "budget"]

WINDOW = 60.0  # seconds: rpm and tpm count what happened in any sliding window this long
PERIOD_RETENTION = 7 * 86400.0  # a period's spend outlives its end this long, for checkpoints and late settles
FOREVER = 365 * 86400.0  # retry_after when no retry can succeed under the current limits
BUSY_RETRY = 1.0  # retry_after when requests in flight are in the way: one of them may end any moment
EPSILON = 1e-9  # money is a float, so sums of reservations may be off by rounding


class Usage(NamedTuple):
    """What a request consumed (or is expected to): tokens, and money from a price table (0 when none).

    A named tuple: made twice per limited request, where a frozen dataclass costs several times more.
    """

    tokens: int = 0
    cost: float = 0.0


NOTHING = Usage()


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits; None means unlimited. Budgets count per `period`, an id the caller derives from the clock."""

    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None
    token_budget: int | None = None
    money_budget: float | None = None
    period: str = "all"
    period_end: float | None = None  # unix time the period ends; None: it never resets

    # What the limits ask of a limiter, worked out once (a key's Limits are reused for its whole period):
    any: bool = field(init=False, repr=False, compare=False)  # any limit set (else no limiter is asked)
    windowed: bool = field(init=False, repr=False, compare=False)  # requests are logged for rpm or tpm
    held: bool = field(init=False, repr=False, compare=False)  # a grant holds a parallel slot or a budget

    def __post_init__(self) -> None:
        windowed = self.rpm is not None or self.tpm is not None
        held = self.parallel is not None or self.token_budget is not None or self.money_budget is not None
        object.__setattr__(self, "windowed", windowed)
        object.__setattr__(self, "held", held)
        object.__setattr__(self, "any", windowed or held)


@dataclass(slots=True)
class Grant:
    """Permission for one request; hand it back to `settle` when the request ends, however it ends."""

    key_id: str
    ticket: str
    limits: Limits
    reserved: Usage
    remaining_requests: int | None
    remaining_tokens: int | None
    settled: bool = False
    hold: Any = None  # what an in-process limiter holds for it (no ticket lookup on the request path)


class LimitExceeded(Exception):
    """A limit refused the request: a 429 with Retry-After; when `permanent`, no retry can succeed as things stand."""

    def __init__(
        self,
        reason: Reason,
        limits: Limits,
        *,
        retry_after: float,
        remaining: tuple[int | None, int | None] = (None, None),
        reserve: Usage = NOTHING,
        budget: Literal["tokens", "money", ""] = "",
        permanent: bool = False,
    ) -> None:
        self.reason: Reason = reason
        self.limits = limits
        self.retry_after = retry_after
        self.remaining_requests, self.remaining_tokens = remaining
        self.permanent = permanent
        super().__init__(_describe(reason, limits, reserve, budget, permanent, retry_after))


def _describe(
    reason: Reason, limits: Limits, reserve: Usage, budget: str, permanent: bool, retry_after: float
) -> str:
    """The client's message: which limit, its value, and what to do next; never any key material."""
    wait = f"retry in {math.ceil(retry_after)}s"
    if reason == "rpm":
        return f"rate limit reached: {limits.rpm} requests per minute; {wait}"
    if reason == "parallel":
        return f"too many requests at once: this key allows {limits.parallel} in flight; {wait}"
    if reason == "tpm":
        if permanent:
            return (f"this request reserves {reserve.tokens} tokens, more than this key's limit of {limits.tpm} "
                    "tokens per minute; lower max_tokens")
        return f"token rate limit reached: {limits.tpm} tokens per minute; {wait}"
    tokens = budget == "tokens"
    kind = f"token budget of {limits.token_budget}" if tokens else f"spend budget of {limits.money_budget:g}"
    if permanent and (reserve.tokens if tokens else reserve.cost) > _budget_of(limits, budget):
        need = f"{reserve.tokens} tokens" if tokens else f"a spend of {reserve.cost:g}"
        return f"this request reserves {need}, more than this key's whole {kind}; lower max_tokens"
    if permanent:
        return f"budget exhausted: this key's lifetime {kind} is spent"
    return f"budget exhausted: this key's {kind} is spent or reserved by requests in flight; {wait}"


def _budget_of(limits: Limits, budget: str) -> float:
    value = limits.token_budget if budget == "tokens" else limits.money_budget
    return math.inf if value is None else value


def budget_refusal(
    limit: float, spent: float, reserved: float, want: float, period_end: float | None, now: float
) -> tuple[float, bool] | None:
    """(retry_after, permanent) when spent + reserved + want exceeds `limit`, else None (redis_limits' Lua agrees)."""
    if spent + reserved + want <= limit + EPSILON:
        return None
    if want > limit + EPSILON:  # more than the whole budget
        return FOREVER, True
    if spent + want > limit + EPSILON:  # settled spend alone leaves no room: only a new period makes some
        return (FOREVER, True) if period_end is None else (max(period_end - now, 0.001), False)
    return BUSY_RETRY, False  # only reservations of requests in flight are in the way


def ticket_source() -> Callable[[], str]:
    """Unique tickets, cheaply: a random per-process prefix (unique across replicas) and a counter."""
    prefix, counter = secrets.token_hex(8), itertools.count()
    return lambda: f"{prefix}{next(counter):x}"


class Limiter(Protocol):
    """Admits or refuses each request of a key against its limits; every Grant must be settled exactly once."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def acquire(self, key_id: str, limits: Limits, reserve: Usage, *, now: float | None = None) -> Grant: ...
    async def settle(self, grant: Grant, used: Usage) -> None: ...
    async def spent(self, key_id: str, period: str) -> Usage: ...
    async def seed(self, key_id: str, period: str, spent: Usage, *, period_end: float | None = None) -> None: ...
    def settled_spend(self) -> dict[tuple[str, str], Usage]: ...


class _Rate:
    """One key's sliding window and count of held grants; dropped once idle.

    The window is two deques of plain numbers (each request's time and tokens), addressed by a
    sequence number: no object per request lives for the 60 s of the window, which at thousands of
    requests per second would cost the garbage collector more than the limit check itself.
    """

    __slots__ = ("first", "held", "times", "tokens", "used")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.used: deque[int] = deque()  # each request's tokens: its reservation until settled
        self.first = 0  # the sequence number of times[0]
        self.tokens = 0  # sum of `used`
        self.held = 0  # unsettled grants holding a parallel slot


class _Period:
    """One key's spend in one budget period: settled, and reserved by grants not yet settled."""

    __slots__ = ("end", "holds", "reserved_cost", "reserved_tokens", "spent_cost", "spent_tokens")

    def __init__(self, end: float | None) -> None:
        self.end = end
        self.spent_tokens, self.spent_cost = 0, 0.0
        self.reserved_tokens, self.reserved_cost, self.holds = 0, 0.0, 0


class _Live:
    __slots__ = ("period", "rate", "sequence")

    def __init__(self, rate: _Rate, sequence: int, period: _Period | None) -> None:
        self.rate, self.sequence, self.period = rate, sequence, period  # sequence -1: not metered


class MemoryLimiter:
    """Limits for one process; the same rules as RedisLimiter, and its fallback while Redis is unreachable.

    No locks: each operation runs without awaiting between its checks and its updates, so on one event
    loop no other request can slip in between.
    """

    def __init__(self) -> None:
        self._rates: dict[str, _Rate] = {}
        self._periods: dict[tuple[str, str], _Period] = {}
        self._next_sweep = 0.0

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release."""

    async def acquire(self, key_id: str, limits: Limits, reserve: Usage, *, now: float | None = None) -> Grant:
        """Check every set limit counting this request; record it and grant, or refuse recording nothing."""
        return self.take(key_id, limits, reserve, now=now)

    async def settle(self, grant: Grant, used: Usage) -> None:
        """Replace the grant's reservation by what was used and free its slot; only the first call counts."""
        self.give_back(grant, used)

    def take(self, key_id: str, limits: Limits, reserve: Usage, *, now: float | None = None) -> Grant:
        """`acquire`, without a coroutine: the request path calls this directly (it never waits).

        Written as one flat body on purpose: it runs for every request of a limited key.
        """
        now = time.time() if now is None else now
        if now >= self._next_sweep:
            self._sweep(now)
        rate = self._rates.get(key_id)
        if rate is None:
            rate = self._rates[key_id] = _Rate()
        times = rate.times
        cut = now - WINDOW
        while times and times[0] <= cut:
            times.popleft()
            rate.tokens -= rate.used.popleft()
            rate.first += 1
        period = self._period(key_id, limits) if limits.held else None
        if not _passes(rate, period, limits, reserve):
            refusal = _refusal(rate, period, limits, reserve, now)
            if refusal is not None:
                raise refusal
        sequence = -1
        if limits.windowed:
            tokens = reserve.tokens if limits.tpm is not None else 0
            times.append(now)
            rate.used.append(tokens)
            rate.tokens += tokens
            if limits.tpm is not None:
                sequence = rate.first + len(times) - 1
        if period is not None:
            rate.held += 1
            period.holds += 1
            period.reserved_tokens += reserve.tokens
            period.reserved_cost += reserve.cost
        return Grant(key_id, "", limits, reserve,
                     None if limits.rpm is None else limits.rpm - len(times),
                     None if limits.tpm is None else limits.tpm - rate.tokens,
                     hold=_Live(rate, sequence, period))

    def give_back(self, grant: Grant, used: Usage) -> None:
        """`settle`, without a coroutine."""
        if grant.settled:
            return
        grant.settled = True
        live = grant.hold
        if not isinstance(live, _Live):
            log.warning("settle of a grant of key %s that no in-process limiter issued; ignored", grant.key_id)
            return
        try:
            rate, held = live.rate, live.period
            index = live.sequence - rate.first
            if live.sequence >= 0 and index >= 0:  # still in the window: its reservation becomes what was used
                rate.tokens += used.tokens - rate.used[index]
                rate.used[index] = used.tokens
            if held is not None:
                rate.held -= 1
                _release(held, grant.reserved)
            period = held if held is not None else self._period(grant.key_id, grant.limits)
            period.spent_tokens += used.tokens
            period.spent_cost += used.cost
        except Exception:  # settling runs in cleanup paths, which must not fail on our account
            log.exception("settling a grant of key %s failed", grant.key_id)

    async def spent(self, key_id: str, period: str) -> Usage:
        """Settled spend of the key in that period, without reservations."""
        record = self._periods.get((key_id, period))
        return Usage() if record is None else Usage(record.spent_tokens, record.spent_cost)

    async def seed(self, key_id: str, period: str, spent: Usage, *, period_end: float | None = None) -> None:
        """Raise the settled spend of (key, period) to at least `spent`, field by field."""
        record = self._periods.get((key_id, period))
        if record is None:
            record = self._periods[(key_id, period)] = _Period(period_end)
        record.spent_tokens = max(record.spent_tokens, spent.tokens)
        record.spent_cost = max(record.spent_cost, spent.cost)

    def settled_spend(self) -> dict[tuple[str, str], Usage]:
        """Every (key, period) with settled spend, for checkpoints."""
        return {
            pair: Usage(record.spent_tokens, record.spent_cost)
            for pair, record in self._periods.items()
            if record.spent_tokens or record.spent_cost
        }

    def _period(self, key_id: str, limits: Limits) -> _Period:
        record = self._periods.get((key_id, limits.period))
        if record is None:
            record = self._periods[(key_id, limits.period)] = _Period(limits.period_end)
        elif record.end is None:
            record.end = limits.period_end  # a seeded record learns its end from the first request
        return record

    def _sweep(self, now: float) -> None:
        """Drop keys idle for a whole window and periods long over, so memory follows the active keys."""
        self._next_sweep = now + WINDOW
        cut = now - WINDOW
        for key_id, rate in list(self._rates.items()):
            if not rate.held and (not rate.times or rate.times[-1] <= cut):
                del self._rates[key_id]
        for pair, record in list(self._periods.items()):
            if not record.holds and record.end is not None and record.end + PERIOD_RETENTION <= now:
                del self._periods[pair]


def _release(period: _Period, reserved: Usage) -> None:
    period.holds -= 1
    if period.holds:
        period.reserved_tokens -= reserved.tokens
        period.reserved_cost -= reserved.cost
    else:  # back to exact zero, so float rounding never accumulates
        period.reserved_tokens, period.reserved_cost = 0, 0.0


def _refusal(rate: _Rate, period: _Period | None, limits: Limits, reserve: Usage, now: float) -> LimitExceeded | None:
    """The most binding refusal (a permanent one, else the longest wait), or None when every limit passes."""
    found: list[tuple[bool, float, Reason, Literal["tokens", "money", ""]]] = []
    times = rate.times
    if limits.rpm is not None and len(times) >= limits.rpm:
        oldest = len(times) - limits.rpm  # this one must leave the window first
        found.append((False, times[oldest] + WINDOW - now if oldest < len(times) else WINDOW, "rpm", ""))
    if limits.tpm is not None and rate.tokens + reserve.tokens > limits.tpm:
        if reserve.tokens > limits.tpm:
            found.append((True, WINDOW, "tpm", ""))
        else:
            found.append((False, _tpm_wait(rate, rate.tokens + reserve.tokens - limits.tpm, now), "tpm", ""))
    if limits.parallel is not None and rate.held >= limits.parallel:
        found.append((False, BUSY_RETRY, "parallel", ""))
    if period is not None:
        if limits.token_budget is not None:
            hit = budget_refusal(limits.token_budget, period.spent_tokens, period.reserved_tokens,
                                 reserve.tokens, limits.period_end, now)
            if hit is not None:
                found.append((hit[1], hit[0], "budget", "tokens"))
        if limits.money_budget is not None:
            hit = budget_refusal(limits.money_budget, period.spent_cost, period.reserved_cost,
                                 reserve.cost, limits.period_end, now)
            if hit is not None:
                found.append((hit[1], hit[0], "budget", "money"))
    if not found:
        return None
    permanent, retry_after, reason, budget = max(found, key=lambda hit: (hit[0], hit[1]))
    remaining = (
        None if limits.rpm is None else max(0, limits.rpm - len(times)),
        None if limits.tpm is None else max(0, limits.tpm - rate.tokens),
    )
    return LimitExceeded(reason, limits, retry_after=retry_after, remaining=remaining, reserve=reserve,
                         budget=budget, permanent=permanent)


def _passes(rate: _Rate, period: _Period | None, limits: Limits, reserve: Usage) -> bool:
    """Whether every set limit lets this request through (the usual case, checked without allocating)."""
    if limits.rpm is not None and len(rate.times) >= limits.rpm:
        return False
    if limits.tpm is not None and rate.tokens + reserve.tokens > limits.tpm:
        return False
    if limits.parallel is not None and rate.held >= limits.parallel:
        return False
    if period is not None:
        if limits.token_budget is not None and (
                period.spent_tokens + period.reserved_tokens + reserve.tokens > limits.token_budget + EPSILON):
            return False
        if limits.money_budget is not None and (
                period.spent_cost + period.reserved_cost + reserve.cost > limits.money_budget + EPSILON):
            return False
    return True


def _tpm_wait(rate: _Rate, excess: int, now: float) -> float:
    """Seconds until enough of the window's tokens age out for `excess` more to fit."""
    for at, tokens in zip(rate.times, rate.used, strict=True):
        excess -= tokens
        if excess <= 0:
            return at + WINDOW - now
    return WINDOW
