"""The scheduler against random request sequences and failures: the budget holds, nothing is lost."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from synapse_gateway.config.schema import GpuConfig
from synapse_gateway.errors import BackendUnavailable
from synapse_gateway.scheduler.coordination import LocalCoordinator
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from synapse_gateway.scheduler.scheduler import Scheduler
from synapse_gateway.scheduler.units import Residency
from tests.unit.scheduler.simulated import SimDriver, SimGpu, sim_unit

GiB = 2**30


def _scheduler(gpu: SimGpu, drivers: list[SimDriver], **gpu_settings: object) -> Scheduler:
    config = GpuConfig.model_validate({"memory": gpu.capacity, "max_wait": 5, "starvation_cap": 0.05,
                                       **gpu_settings})
    return Scheduler(config, [sim_unit(d) for d in drivers], LocalCoordinator(),
                     SchedulerMetrics(CollectorRegistry()))


async def _request(scheduler: Scheduler, driver: SimDriver, hold: float) -> str:
    unit = scheduler.units[driver.name]
    asked = time.monotonic()
    try:
        await scheduler.acquire(unit)
    except BackendUnavailable:
        return "refused"
    finally:
        waited = time.monotonic() - asked
        assert waited <= scheduler.settings.max_wait + 0.5, f"waited {waited:.2f}s, past the wait limit"
    try:
        await driver.serve(hold)
    finally:
        scheduler.release(unit)
    return "served"


requests = st.lists(st.tuples(st.integers(0, 3), st.floats(0, 0.01), st.floats(0, 0.005)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=requests, failures=st.lists(st.integers(0, 2), min_size=4, max_size=4),
       sizes=st.lists(st.integers(2, 12), min_size=4, max_size=4))
def test_budget_holds_and_every_request_is_answered(plan: list[tuple[int, float, float]], failures: list[int],
                                                    sizes: list[int]) -> None:
    async def run() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        drivers = [SimDriver(f"b{i}", gpu, memory=size * GiB, sleeping=GiB // 4 if i == 0 else 0,
                             fail_wakes=fail) for i, (size, fail) in enumerate(zip(sizes, failures, strict=True))]
        scheduler = _scheduler(gpu, drivers)
        gpu.used = sum(d.sleeping for d in drivers)
        await scheduler.start()

        async def delayed(index: int, delay: float, hold: float) -> str:
            await asyncio.sleep(delay)
            return await _request(scheduler, drivers[index], hold)

        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*(delayed(*p) for p in plan)), timeout=30)
        await scheduler.stop()
        assert gpu.violations == []
        assert len(outcomes) == len(plan)  # none lost, none deadlocked
        assert time.monotonic() - started < 30
        assert scheduler.used("gpu0") <= 16 * GiB
        assert scheduler.used("gpu0") == gpu.used, "the scheduler's books match the device"
        served = [o for o, p in zip(outcomes, plan, strict=True) if o == "served"]
        assert len(served) >= sum(1 for p in plan if failures[p[0]] == 0), "only injected failures refuse"

    asyncio.run(run())


async def test_many_waiters_trigger_one_wake() -> None:
    gpu = SimGpu(capacity=16 * GiB)
    a, b = SimDriver("a", gpu, memory=12 * GiB, wake_delay=0.05), SimDriver("b", gpu, memory=12 * GiB)
    scheduler = _scheduler(gpu, [a, b])
    await scheduler.start()
    outcomes = await asyncio.gather(*(_request(scheduler, a, 0.001) for _ in range(50)))
    assert outcomes == ["served"] * 50
    assert a.wakes == 1
    await scheduler.stop()


async def test_alternating_backends_swap_each_time() -> None:
    gpu = SimGpu(capacity=16 * GiB)
    chat, tts = SimDriver("vllm", gpu, memory=6 * GiB, sleeping=GiB), SimDriver("tts", gpu, memory=12 * GiB)
    gpu.used = GiB
    scheduler = _scheduler(gpu, [chat, tts])
    await scheduler.start()
    for _ in range(3):
        assert await _request(scheduler, chat, 0) == "served"
        assert await _request(scheduler, tts, 0) == "served"
    assert (chat.wakes, chat.sleeps, tts.wakes, tts.sleeps) == (3, 3, 3, 2)
    assert gpu.violations == []
    await scheduler.stop()


async def test_a_busy_unit_is_not_evicted_and_is_drained_against_starvation() -> None:
    gpu = SimGpu(capacity=16 * GiB)
    a, b = SimDriver("a", gpu, memory=10 * GiB), SimDriver("b", gpu, memory=10 * GiB)
    scheduler = _scheduler(gpu, [a, b])
    await scheduler.start()
    assert await _request(scheduler, a, 0) == "served"

    async def keep_a_busy() -> None:
        for _ in range(40):
            await _request(scheduler, a, 0.01)

    busy = asyncio.create_task(keep_a_busy())
    await asyncio.sleep(0.02)
    assert await asyncio.wait_for(_request(scheduler, b, 0), timeout=5) == "served"
    await busy
    assert gpu.violations == []
    await scheduler.stop()


async def test_queue_bound_and_wait_limit_refuse_with_503() -> None:
    gpu = SimGpu(capacity=16 * GiB)
    slow = SimDriver("slow", gpu, memory=8 * GiB, wake_delay=1.0)
    scheduler = _scheduler(gpu, [slow], max_queue=3, max_wait=0.2)
    await scheduler.start()
    outcomes = await asyncio.gather(*(_request(scheduler, slow, 0) for _ in range(6)))
    assert outcomes.count("refused") == 6  # 3 over the bound at once, 3 past the wait limit
    await scheduler.stop()


async def test_min_residency_and_idle_timeout() -> None:
    gpu = SimGpu(capacity=16 * GiB)
    a = SimDriver("a", gpu, memory=4 * GiB)
    config = GpuConfig.model_validate({"memory": 16 * GiB})
    unit = sim_unit(a, idle_timeout=0.5)
    scheduler = Scheduler(config, [unit], LocalCoordinator(), SchedulerMetrics(CollectorRegistry()))
    await scheduler.start()
    assert await _request(scheduler, a, 0) == "served"
    assert unit.state is Residency.RESIDENT
    await asyncio.sleep(2.2)
    assert unit.state is Residency.ASLEEP and a.sleeps == 1
    await scheduler.stop()


@pytest.mark.parametrize("memory", [17])
async def test_a_unit_larger_than_the_device_is_refused(memory: int) -> None:
    gpu = SimGpu(capacity=16 * GiB)
    big = SimDriver("big", gpu, memory=memory * GiB)
    scheduler = _scheduler(gpu, [big])
    await scheduler.start()
    assert await _request(scheduler, big, 0) == "refused"
    assert gpu.violations == []
    await scheduler.stop()
