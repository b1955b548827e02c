"""Per-key limits, exact under concurrency: each rule holds for the in-process limiter and for Redis alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from synapse_gateway.access.limits import Grant, Limiter, LimitExceeded, Limits, MemoryLimiter, Usage
from synapse_gateway.access.redis_limits import RedisLimiter
from tests.services import REDIS_HOST, REDIS_PORT, CuttableRelay, drop_redis_keys, require_redis

LEASE = 0.6  # seconds; short, so a dead replica's grants lapse within the test
HOUR = 3600.0
StartReplica = Callable[..., Awaitable[RedisLimiter]]

# Another replica in its own process, so it can really die (SIGKILL) holding a parallel slot and a reservation.
CHILD = """
import asyncio, sys, time
from synapse_gateway.access.limits import Limits, Usage
from synapse_gateway.access.redis_limits import RedisLimiter

async def main(url: str, prefix: str, lease: float) -> None:
    child = RedisLimiter(url, prefix=prefix, lease=lease)
    await child.start()
    limits = Limits(parallel=2, token_budget=200, period="p1", period_end=time.time() + 3600)
    await child.acquire("k", limits, Usage(100))
    print("held", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def in_period(*, token_budget: int | None = None, money_budget: float | None = None) -> Limits:
    """Budgets for a period that ends in an hour."""
    return Limits(token_budget=token_budget, money_budget=money_budget, period="p1", period_end=time.time() + HOUR)


def limiter_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "synapse.limits" and r.levelno >= logging.WARNING]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    url = require_redis()
    prefix = f"synapse-test-{uuid.uuid4().hex}"
    yield prefix
    await drop_redis_keys(prefix, url)


@pytest.fixture
async def replicas(prefix: str, caplog: pytest.LogCaptureFixture) -> AsyncIterator[StartReplica]:
    """Start RedisLimiters sharing one key prefix, as replicas do; they must never have fallen back."""
    started: list[RedisLimiter] = []

    async def start(url: str = f"redis://{REDIS_HOST}:{REDIS_PORT}/0", *, recheck: float = 2.0) -> RedisLimiter:
        replica = RedisLimiter(url, prefix=prefix, lease=LEASE, recheck=recheck)
        await replica.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.close()
    assert limiter_warnings(caplog) == []


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Limiter]:
    """Each implementation in turn; the Redis one must have answered every call through Redis, not its fallback."""
    if request.param == "memory":
        yield MemoryLimiter()
        return
    url = require_redis()
    prefix = f"synapse-test-{uuid.uuid4().hex}"
    redis_limiter = RedisLimiter(url, prefix=prefix, lease=LEASE)
    await redis_limiter.start()
    try:
        yield redis_limiter
    finally:
        await redis_limiter.close()
        await drop_redis_keys(prefix, url)
    assert limiter_warnings(caplog) == []


async def attempt(limiters: list[Limiter], count: int, limits: Limits, reserve: Usage,
                  ) -> tuple[list[Grant], list[LimitExceeded]]:
    """`count` concurrent acquires for key "k", spread over `limiters` in turn; nothing but grants and refusals."""
    calls = [limiters[i % len(limiters)].acquire("k", limits, reserve) for i in range(count)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    grants = [result for result in results if isinstance(result, Grant)]
    refusals = [result for result in results if isinstance(result, LimitExceeded)]
    assert len(grants) + len(refusals) == count, results
    return grants, refusals


async def refusal(limiter: Limiter, limits: Limits, reserve: Usage, key: str = "k") -> LimitExceeded:
    with pytest.raises(LimitExceeded) as refused:
        await limiter.acquire(key, limits, reserve)
    return refused.value


async def test_rpm_admits_exactly_the_limit_of_concurrent_requests(limiter: Limiter) -> None:
    grants, refusals = await attempt([limiter], 50, Limits(rpm=10), Usage())
    assert len(grants) == 10
    assert sorted(grant.remaining_requests or 0 for grant in grants) == list(range(10))
    assert {exc.reason for exc in refusals} == {"rpm"}
    assert all(59 < exc.retry_after <= 60 and exc.remaining_requests == 0 for exc in refusals)
    assert "10 requests per minute" in str(refusals[0])
    await limiter.acquire("another key", Limits(rpm=10), Usage())


async def test_requests_leave_the_window_sixty_seconds_after_they_came() -> None:
    limiter, two = MemoryLimiter(), Limits(rpm=2)
    await limiter.acquire("k", two, Usage(), now=1000.0)
    await limiter.acquire("k", two, Usage(), now=1030.0)
    with pytest.raises(LimitExceeded) as early:
        await limiter.acquire("k", two, Usage(), now=1059.5)
    assert early.value.retry_after == pytest.approx(0.5)
    assert (await limiter.acquire("k", two, Usage(), now=1060.0)).remaining_requests == 0
    with pytest.raises(LimitExceeded) as next_one:
        await limiter.acquire("k", two, Usage(), now=1089.0)
    assert next_one.value.retry_after == pytest.approx(1.0)


async def test_tokens_leave_the_window_sixty_seconds_after_their_request_came() -> None:
    limiter, hundred = MemoryLimiter(), Limits(tpm=100)
    await limiter.settle(await limiter.acquire("k", hundred, Usage(50), now=1000.0), Usage(60))
    await limiter.acquire("k", hundred, Usage(30), now=1020.0)
    with pytest.raises(LimitExceeded) as refused:
        await limiter.acquire("k", hundred, Usage(20), now=1030.0)
    assert refused.value.retry_after == pytest.approx(30.0)  # the settled 60 must go; the 30 may stay
    assert (await limiter.acquire("k", hundred, Usage(70), now=1060.0)).remaining_tokens == 0


async def test_a_request_settled_after_it_left_the_window_changes_nothing_there() -> None:
    limiter, hundred = MemoryLimiter(), Limits(tpm=100)
    long_one = await limiter.acquire("k", hundred, Usage(50), now=1000.0)
    await limiter.acquire("k", hundred, Usage(), now=1030.0)
    await limiter.acquire("k", hundred, Usage(60), now=1061.0)
    await limiter.settle(long_one, Usage(10))
    with pytest.raises(LimitExceeded):
        await limiter.acquire("k", hundred, Usage(50), now=1062.0)


async def test_settling_replaces_the_token_reservation_by_what_was_used(limiter: Limiter) -> None:
    limits = Limits(tpm=1000)
    first = await limiter.acquire("k", limits, Usage(800))
    assert first.remaining_tokens == 200
    refused = await refusal(limiter, limits, Usage(300))
    assert (refused.reason, refused.remaining_tokens, refused.permanent) == ("tpm", 200, False)
    assert 59 < refused.retry_after <= 60
    await limiter.settle(first, Usage(100))
    assert (await limiter.acquire("k", limits, Usage(300))).remaining_tokens == 600


async def test_a_reservation_larger_than_tpm_is_refused_as_one_that_could_never_pass(limiter: Limiter) -> None:
    refused = await refusal(limiter, Limits(tpm=100), Usage(101))
    assert (refused.reason, refused.permanent) == ("tpm", True)
    assert "reserves 101 tokens" in str(refused) and "100 tokens per minute" in str(refused)
    assert (await limiter.acquire("k", Limits(tpm=100), Usage(100))).remaining_tokens == 0  # nothing was recorded


async def test_a_parallel_slot_is_held_until_settled_once(limiter: Limiter) -> None:
    one = Limits(parallel=1)
    first = await limiter.acquire("k", one, Usage())
    refused = await refusal(limiter, one, Usage())
    assert refused.reason == "parallel" and 0 < refused.retry_after <= 1
    await limiter.settle(first, Usage())
    await limiter.settle(first, Usage())  # harmless: it must not free a second slot
    await limiter.acquire("k", one, Usage())
    assert (await refusal(limiter, one, Usage())).reason == "parallel"


async def test_a_token_budget_that_fits_one_reservation_admits_exactly_one(limiter: Limiter) -> None:
    limits = in_period(token_budget=100)
    grants, refusals = await attempt([limiter], 50, limits, Usage(60))
    assert len(grants) == 1
    assert {exc.reason for exc in refusals} == {"budget"}
    assert all(exc.retry_after <= 1 for exc in refusals)  # only a request in flight is in the way
    await limiter.settle(grants[0], Usage(30))
    assert await limiter.spent("k", "p1") == Usage(30)
    second = await limiter.acquire("k", limits, Usage(60))  # 30 spent + 60 reserved fit
    await limiter.settle(second, Usage(60))
    spent_out = await refusal(limiter, limits, Usage(60))
    assert spent_out.reason == "budget" and not spent_out.permanent
    assert HOUR - 60 < spent_out.retry_after <= HOUR  # the period's end
    assert "token budget of 100" in str(spent_out)
    await limiter.acquire("k", Limits(token_budget=100, period="p2", period_end=time.time() + 2 * HOUR), Usage(60))


async def test_a_money_budget_that_fits_one_reservation_admits_exactly_one(limiter: Limiter) -> None:
    limits = in_period(money_budget=1.0)
    grants, _ = await attempt([limiter], 50, limits, Usage(cost=0.6))
    assert len(grants) == 1
    await limiter.settle(grants[0], Usage(10, 0.25))
    await limiter.acquire("k", limits, Usage(cost=0.6))  # 0.25 + 0.6 fit
    assert (await refusal(limiter, limits, Usage(cost=0.6))).reason == "budget"
    spent = await limiter.spent("k", "p1")  # 0.25 is exact in binary, so no rounding to allow for
    assert spent == Usage(10, 0.25)


async def test_a_spent_lifetime_budget_refuses_for_good(limiter: Limiter) -> None:
    lifetime = Limits(token_budget=100)
    await limiter.settle(await limiter.acquire("k", lifetime, Usage(50)), Usage(80))
    refused = await refusal(limiter, lifetime, Usage(30))
    assert refused.permanent and refused.retry_after >= 86400 and "lifetime" in str(refused)
    await limiter.acquire("k", lifetime, Usage(20))


async def test_seeded_spend_is_read_back_and_counts_against_the_budget(limiter: Limiter) -> None:
    await limiter.seed("k", "p1", Usage(50, 1.5))
    await limiter.seed("k", "p1", Usage(10, 2.0))  # raises each field to at least the seed, never lowers
    assert await limiter.spent("k", "p1") == Usage(50, 2.0)
    assert await limiter.spent("k", "p0") == Usage()
    assert (await refusal(limiter, in_period(token_budget=100), Usage(60))).reason == "budget"
    await limiter.acquire("k", in_period(token_budget=100), Usage(50))
    assert limiter.settled_spend()[("k", "p1")] == Usage(50, 2.0)


async def test_idle_keys_and_long_ended_periods_are_forgotten() -> None:
    limiter, limits = MemoryLimiter(), Limits(rpm=5, token_budget=10**6, period="p1", period_end=1100.0)
    for key in range(1000):
        await limiter.settle(await limiter.acquire(f"k{key}", limits, Usage(1), now=1000.0), Usage(1))
    active = await limiter.acquire("k0", limits, Usage(1), now=1061.0)
    assert set(limiter._rates) == {"k0"}  # memory follows the active keys
    await limiter.settle(active, Usage(1))
    await limiter.acquire("k0", Limits(rpm=5), Usage(), now=1100.0 + 8 * 86400)
    assert limiter.settled_spend() == {}


async def test_two_replicas_hold_one_rpm_together(replicas: StartReplica) -> None:
    pair: list[Limiter] = [await replicas(), await replicas()]
    grants, _ = await attempt(pair, 30, Limits(rpm=10), Usage())
    assert len(grants) == 10


async def test_two_replicas_hold_one_budget_together(replicas: StartReplica) -> None:
    pair: list[Limiter] = [await replicas(), await replicas()]
    grants, _ = await attempt(pair, 50, in_period(token_budget=100, money_budget=1.0), Usage(60, 0.1))
    assert len(grants) == 1


async def test_a_dead_replica_frees_its_slot_and_reservation_within_a_lease(
    replicas: StartReplica, prefix: str
) -> None:
    survivor = await replicas()
    limits = Limits(parallel=2, token_budget=200, period="p1", period_end=time.time() + HOUR)
    args = (sys.executable, "-c", CHILD, f"redis://{REDIS_HOST}:{REDIS_PORT}/0", prefix, str(LEASE))
    pipe = asyncio.subprocess.PIPE
    child = await asyncio.create_subprocess_exec(*args, stdin=pipe, stdout=pipe)
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), timeout=20) == b"held\n"
        await survivor.acquire("k", limits, Usage(100))  # held throughout, so the key's structures stay alive
        await asyncio.sleep(1.5 * LEASE)  # past a lease: only the child's refresher keeps its grant alive
        assert (await refusal(survivor, limits, Usage(100))).reason == "parallel"
        child.kill()
        killed = time.monotonic()
        while True:
            with contextlib.suppress(LimitExceeded):
                await survivor.acquire("k", limits, Usage(100))
                break
            assert time.monotonic() - killed < LEASE + 1.0, "the dead replica's grant still holds"  # slack for load
            await asyncio.sleep(0.05)
    finally:
        if child.returncode is None:
            child.kill()
        await child.communicate()


async def test_period_spend_in_redis_expires_a_week_after_the_period(replicas: StartReplica, prefix: str) -> None:
    limiter = await replicas()
    end = time.time() + HOUR
    await limiter.settle(await limiter.acquire("k", Limits(token_budget=9, period="p1", period_end=end), Usage()),
                         Usage(3))
    await limiter.settle(await limiter.acquire("k", Limits(token_budget=9), Usage()), Usage(3))
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        assert await client.ttl(f"{prefix}:limits:{{k}}:spend:p1") == pytest.approx(HOUR + 7 * 86400, abs=5)
        assert await client.ttl(f"{prefix}:limits:{{k}}:spend:all") == -1  # a lifetime's spend never expires
    finally:
        await client.aclose()


async def test_without_redis_limits_still_hold_per_replica(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter("redis://127.0.0.1:1/0", lease=LEASE)
    await limiter.start()
    try:
        grants, refusals = await attempt([limiter], 10, Limits(rpm=3, token_budget=100), Usage(10))
        assert (len(grants), {exc.reason for exc in refusals}) == (3, {"rpm"})
        for grant in grants:
            await limiter.settle(grant, Usage(5, 0.5))
        await limiter.seed("k", "all", Usage(20))
        assert await limiter.spent("k", "all") == Usage(20, 1.5)
        assert limiter.settled_spend() == {("k", "all"): Usage(20, 1.5)}
    finally:
        await limiter.close()
    warnings = limiter_warnings(caplog)
    assert len(warnings) == 1 and "127.0.0.1:1" in warnings[0]


async def test_an_outage_keeps_budgets_and_pays_its_spend_when_redis_returns(
    replicas: StartReplica, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="synapse.limits")
    with CuttableRelay(REDIS_HOST, REDIS_PORT) as relay:  # cut and restored on the same port
        limiter = await replicas(f"redis://127.0.0.1:{relay.port}/0", recheck=0.1)
        limits = in_period(token_budget=100)
        await limiter.settle(await limiter.acquire("k", limits, Usage(40)), Usage(40))
        relay.cut()
        during = await limiter.acquire("k", limits, Usage(40))  # in-process, from the 40 Redis last reported
        assert (await refusal(limiter, limits, Usage(40))).reason == "budget"
        await limiter.settle(during, Usage(30))
        relay.restore()
        client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=True)
        try:
            deadline = time.monotonic() + 3
            while await client.hget(f"{prefix}:limits:{{k}}:spend:p1", "tokens") != "70":
                assert time.monotonic() < deadline, "the spend settled during the outage never reached Redis"
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        assert await limiter.spent("k", "p1") == Usage(70)
        assert len(limiter_warnings(caplog)) == 1
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            f"Redis at redis://127.0.0.1:{relay.port}/0 answers again: limits are shared across replicas again"
        ]
        caplog.clear()  # the outage was staged: the fixture's check for fallbacks must not count it


async def test_a_grant_made_for_a_request_that_left_is_given_back(replicas: StartReplica) -> None:
    """The client disconnects while Redis is granting: the slot must not stay taken for the lease."""
    limiter = await replicas()
    limits = Limits(parallel=1)
    leaving = asyncio.ensure_future(limiter.acquire("k", limits, Usage(1)))
    await asyncio.sleep(0)  # the script is on its way
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    for _ in range(100):
        try:
            grant = await limiter.acquire("k", limits, Usage(1))
            break
        except LimitExceeded:
            await asyncio.sleep(0.01)
    else:
        raise AssertionError("the departed request's slot was not given back within a second")
    await limiter.settle(grant, Usage(1))
