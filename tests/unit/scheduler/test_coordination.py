"""Coordination between replicas, against a real Redis: leases, fencing, the shared table, in-flight counts."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from synapse_gateway.config.schema import GpuConfig
from synapse_gateway.scheduler.coordination import (
    Coordinator,
    CoordinatorUnavailable,
    LeaseLost,
    LeaseTimeout,
    LocalCoordinator,
    StaleToken,
)
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from synapse_gateway.scheduler.redis_coordination import RedisCoordinator
from synapse_gateway.scheduler.scheduler import Scheduler
from tests.services import REDIS_HOST, REDIS_URL, drop_redis_keys, require_redis
from tests.unit.scheduler.simulated import SimDriver, SimGpu, sim_unit

GiB = 2**30

# Another replica in its own process, so it can really die (SIGKILL) or stall (SIGSTOP) holding the lease.
CHILD = """
import asyncio, sys
from synapse_gateway.scheduler.coordination import LeaseLost, StaleToken
from synapse_gateway.scheduler.redis_coordination import RedisCoordinator

async def main(url: str, prefix: str, ttl: float) -> None:
    child = RedisCoordinator(url, replica="child", prefix=prefix, lease_ttl=ttl, in_flight_ttl=ttl)
    await child.connect()
    async with child.lease("gpu0") as lease:
        await child.report_in_flight("llama", 2)
        print("held", lease.token, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        try:
            await child.publish("llama", {"replica": "child"}, lease.token)
            published = "published"
        except StaleToken:
            published = "StaleToken"
        try:
            lease.check()
            checked = "held"
        except LeaseLost:
            checked = "LeaseLost"
        print(published, checked, flush=True)
    await child.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


class StartReplica(Protocol):
    def __call__(self, name: str, **settings: float) -> Awaitable[RedisCoordinator]: ...


class ChildReplica:
    """A replica in a subprocess holding gpu0 with 2 requests in flight; reaped however the test ends."""

    def __init__(self, prefix: str, ttl: float) -> None:
        self.args = (sys.executable, "-c", CHILD, REDIS_URL, prefix, str(ttl))
        self.token = 0

    async def __aenter__(self) -> ChildReplica:
        pipe = asyncio.subprocess.PIPE
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdin=pipe, stdout=pipe)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=20)
        assert line.split()[:1] == [b"held"], line
        self.token = int(line.split()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.communicate()

    async def resume_and_write(self) -> list[bytes]:
        """Let it run again and try to publish with its old token; return what it saw."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.write(b"go\n")
        return (await asyncio.wait_for(self.proc.stdout.readline(), timeout=20)).split()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    require_redis()
    prefix = f"synapse-test-{uuid.uuid4().hex}"
    yield prefix
    await drop_redis_keys(prefix)


@pytest.fixture
async def replicas(prefix: str) -> AsyncIterator[StartReplica]:
    """Start named replicas sharing one key prefix; all are closed at the end of the test."""
    started: list[RedisCoordinator] = []

    async def start(name: str, **settings: float) -> RedisCoordinator:
        replica = RedisCoordinator(REDIS_URL, replica=name, prefix=prefix, **settings)
        await replica.connect()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.close()


@pytest.fixture(params=["local", "redis"])
async def coordinator(request: pytest.FixtureRequest) -> AsyncIterator[Coordinator]:
    """The single-replica cases, which both implementations must pass alike."""
    if request.param == "local":
        yield LocalCoordinator()
        return
    require_redis()
    prefix = f"synapse-test-{uuid.uuid4().hex}"
    solo = RedisCoordinator(REDIS_URL, replica="solo", prefix=prefix, lease_ttl=2.0)
    await solo.connect()
    try:
        yield solo
    finally:
        await solo.close()
        await drop_redis_keys(prefix)


async def hammer(coordinators: list[Coordinator], tasks_each: int, rounds: int) -> list[int]:
    """Take one device's lease from many tasks at once; return tokens in the order the lease was held."""
    holders, tokens = 0, []

    async def worker(coordinator: Coordinator) -> None:
        nonlocal holders
        for _ in range(rounds):
            async with coordinator.lease("gpu0") as lease:
                holders += 1
                assert holders == 1, "two holders of one device lease at once"
                tokens.append(lease.token)
                await asyncio.sleep(0.002)  # let every other task run while the lease is held
                holders -= 1

    await asyncio.gather(*(worker(c) for c in coordinators for _ in range(tasks_each)))
    return tokens


def strictly_increasing(tokens: list[int]) -> bool:
    return tokens == sorted(set(tokens))


# --- one replica: LocalCoordinator and RedisCoordinator alike ---


async def test_lease_excludes_tasks_and_tokens_increase(coordinator: Coordinator) -> None:
    tokens = await hammer([coordinator], tasks_each=5, rounds=4)
    assert len(tokens) == 20
    assert strictly_increasing(tokens)


async def test_published_record_appears_in_snapshot(coordinator: Coordinator) -> None:
    record = {"state": "resident", "memory": 8_000_000_000, "since": 1.5, "replica": "a"}
    async with coordinator.lease("gpu0") as lease:
        lease.check()
        await coordinator.publish("llama", record, lease.token)
    snapshot = await coordinator.snapshot()
    assert snapshot == {"llama": record}
    snapshot["llama"]["state"] = "mutated"
    assert (await coordinator.snapshot())["llama"]["state"] == "resident"


async def test_superseded_token_cannot_publish(coordinator: Coordinator) -> None:
    async with coordinator.lease("gpu0") as old:
        pass
    async with coordinator.lease("gpu0") as new:
        await coordinator.publish("llama", {"state": "resident"}, new.token)
    with pytest.raises(StaleToken, match="fencing token"):
        await coordinator.publish("llama", {"state": "asleep"}, old.token)
    assert await coordinator.snapshot() == {"llama": {"state": "resident"}}


async def test_devices_fence_independently(coordinator: Coordinator) -> None:
    async with coordinator.lease("gpu0") as first, coordinator.lease("gpu1") as second:
        assert second.token > first.token
        await coordinator.publish("llama", {"state": "resident"}, first.token)
        await coordinator.publish("qwen", {"state": "resident"}, second.token)
    assert set(await coordinator.snapshot()) == {"llama", "qwen"}


async def test_own_in_flight_is_not_elsewhere(coordinator: Coordinator) -> None:
    await coordinator.report_in_flight("llama", 3)
    assert await coordinator.in_flight_elsewhere("llama") == 0


# --- several replicas on one Redis ---


async def test_two_replicas_never_hold_one_device_at_once(replicas: StartReplica) -> None:
    a, b = await replicas("a"), await replicas("b")
    tokens = await hammer([a, b], tasks_each=4, rounds=6)
    assert len(tokens) == 48
    assert strictly_increasing(tokens), "fencing tokens must rise across replicas in lease order"


async def test_in_flight_of_other_replicas_is_visible_and_withdrawn(replicas: StartReplica) -> None:
    a, b = await replicas("a", in_flight_ttl=0.6), await replicas("b", in_flight_ttl=0.6)
    await a.report_in_flight("llama", 3)
    await b.report_in_flight("llama", 1)
    assert await b.in_flight_elsewhere("llama") == 3
    assert await a.in_flight_elsewhere("llama") == 1
    await asyncio.sleep(1.0)  # past the ttl: the heartbeat keeps a live replica's count
    assert await b.in_flight_elsewhere("llama") == 3
    await a.report_in_flight("llama", 0)
    assert await b.in_flight_elsewhere("llama") == 0
    await a.report_in_flight("llama", 2)
    await a.close()
    assert await b.in_flight_elsewhere("llama") == 0


async def test_records_nobody_refreshes_age_out(replicas: StartReplica) -> None:
    forgetful, busy = await replicas("forgetful", record_ttl=0.5), await replicas("busy")
    async with forgetful.lease("gpu0") as lease:
        await forgetful.publish("llama", {"state": "resident"}, lease.token)
    await asyncio.sleep(0.3)
    async with busy.lease("gpu0") as lease:  # this write refreshes the table but not forgetful's record
        await busy.publish("qwen", {"state": "resident"}, lease.token)
    await asyncio.sleep(0.4)
    assert set(await busy.snapshot()) == {"qwen"}


async def test_dead_replica_loses_lease_and_in_flight_after_ttl(replicas: StartReplica, prefix: str) -> None:
    ttl = 1.0
    async with ChildReplica(prefix, ttl) as child:
        impatient = await replicas("impatient", acquire_timeout=1.5 * ttl)
        with pytest.raises(LeaseTimeout, match="gpu0"):  # waits past the ttl: renewal keeps the lease held
            async with impatient.lease("gpu0"):
                pass
        assert await impatient.in_flight_elsewhere("llama") == 2
        child.proc.kill()
        await child.proc.wait()
        killed = time.monotonic()
        survivor = await replicas("survivor", acquire_timeout=3 * ttl)
        await survivor.report_in_flight("llama", 1)  # a live count in the same hash must not keep the dead one
        async with survivor.lease("gpu0") as lease:
            assert time.monotonic() - killed < ttl + 0.5
            assert lease.token > child.token
        await asyncio.sleep(max(0.0, killed + ttl + 0.2 - time.monotonic()))
        assert await impatient.in_flight_elsewhere("llama") == 1


async def test_stalled_replica_is_fenced_off_when_it_resumes(replicas: StartReplica, prefix: str) -> None:
    async with ChildReplica(prefix, ttl=0.6) as child:
        child.proc.send_signal(signal.SIGSTOP)  # a long GC pause or a frozen VM, while holding the lease
        b = await replicas("b", acquire_timeout=3.0)
        async with b.lease("gpu0") as lease:
            assert lease.token > child.token
            await b.publish("llama", {"replica": "b"}, lease.token)
            assert await child.resume_and_write() == [b"StaleToken", b"LeaseLost"]
            await child.proc.wait()  # it has left its lease block, releasing only a lease still its own
            bystander = await replicas("bystander", acquire_timeout=0.3)
            with pytest.raises(LeaseTimeout):
                async with bystander.lease("gpu0"):
                    pass
            lease.check()
        assert await b.snapshot() == {"llama": {"replica": "b"}}


async def test_lease_whose_key_vanished_is_flagged_lost(replicas: StartReplica, prefix: str) -> None:
    a = await replicas("a", lease_ttl=0.6)
    async with a.lease("gpu0") as lease:
        raw = aioredis.Redis.from_url(REDIS_URL)
        try:  # as if it expired while this replica was stalled, and another replica then took it
            await raw.delete(f"{prefix}:lease:gpu0")
        finally:
            await raw.aclose()
        async with (await replicas("b")).lease("gpu0"):
            await asyncio.wait_for(lease.lost.wait(), timeout=2.0)
            with pytest.raises(LeaseLost, match="gpu0"):
                lease.check()


async def test_unreachable_redis_is_named_without_its_password() -> None:
    with socket.socket() as held:  # bound but never listening: connections are refused at once
        held.bind((REDIS_HOST, 0))
        port = held.getsockname()[1]
        coordinator = RedisCoordinator(f"redis://:hunter2@{REDIS_HOST}:{port}/0", replica="a")
        with pytest.raises(CoordinatorUnavailable, match=f"{REDIS_HOST}:{port}") as caught:
            await coordinator.connect()
        await coordinator.close()
    assert "hunter2" not in str(caught.value)


# --- fencing tokens and shutdown, against the real Redis ---


async def test_tokens_never_repeat_after_redis_loses_its_counter(replicas: StartReplica, prefix: str) -> None:
    a = await replicas("a")
    async with a.lease("gpu0") as first:
        await a.publish("llama", {"state": "resident"}, first.token)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:  # what a Redis restart without persistence leaves: no counter, no newest tokens
        await raw.delete(f"{prefix}:fence:counter", f"{prefix}:fence:newest")
    finally:
        await raw.aclose()
    async with a.lease("gpu0") as second:
        assert second.token > first.token
        await a.publish("llama", {"state": "asleep"}, second.token)
    with pytest.raises(StaleToken):
        await a.publish("llama", {"state": "resident"}, first.token)


@pytest.mark.timeout(30)
async def test_close_returns_even_if_the_heartbeat_loses_a_cancellation(prefix: str) -> None:
    replica = RedisCoordinator(REDIS_URL, replica="a", prefix=prefix, in_flight_ttl=0.3, close_timeout=1.0)
    await replica.connect()
    await replica.report_in_flight("llama", 1)
    put, inside = replica._put_in_flight, asyncio.Event()

    async def swallowing(unit: str, count: int) -> None:
        inside.set()
        try:
            await put(unit, count)
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:  # as a client library that loses a cancellation would
            pass

    replica._put_in_flight = swallowing  # type: ignore[method-assign]
    await asyncio.wait_for(inside.wait(), timeout=5)  # the heartbeat is refreshing the count right now
    await asyncio.wait_for(replica.close(), timeout=5)
    await replica.close()  # twice is harmless


async def test_a_wake_is_abandoned_when_the_redis_lease_is_lost_and_done_again(replicas: StartReplica,
                                                                               prefix: str) -> None:
    a, b = await replicas("a", lease_ttl=0.6), await replicas("b", acquire_timeout=3.0)
    gpu = SimGpu(capacity=16 * GiB)
    driver = SimDriver("llama", gpu, memory=8 * GiB, wake_delay=2.0)
    settings = GpuConfig.model_validate({"memory": 16 * GiB, "max_wait": 30, "nvml": False})
    scheduler = Scheduler(settings, [sim_unit(driver)], a, SchedulerMetrics(CollectorRegistry()))
    scheduler.poll_interval = 0.05
    await scheduler.start()
    acquiring = asyncio.create_task(scheduler.acquire(scheduler.units["llama"]))
    await asyncio.sleep(0.3)  # the wake is under way
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:  # as if this replica stalled past its ttl and another replica took the device
        await raw.delete(f"{prefix}:lease:gpu0")
    finally:
        await raw.aclose()
    async with b.lease("gpu0"):
        await asyncio.sleep(0.5)  # long enough for a's renewal to find the lease gone
    await asyncio.wait_for(acquiring, timeout=10)
    scheduler.release(scheduler.units["llama"])
    assert driver.wakes == 1, "the first wake was abandoned, the second done under a fresh lease"
    assert (await a.snapshot())["llama"]["state"] == "resident"
    assert gpu.violations == []
    await scheduler.stop()
