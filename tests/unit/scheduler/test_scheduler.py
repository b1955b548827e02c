"""The scheduler against simulated backends, in virtual time: the budget holds, nothing is lost, the policy is kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from synapse_gateway.config.schema import GpuConfig
from synapse_gateway.errors import BackendUnavailable, BadGateway, Conflict
from synapse_gateway.scheduler.coordination import Coordinator, Lease, LocalCoordinator, StaleToken
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from synapse_gateway.scheduler.scheduler import QueueFull, Scheduler
from synapse_gateway.scheduler.units import Residency, Unit
from tests.unit.scheduler.simulated import (
    PROBE_FAULTS,
    SLEEP_FAULTS,
    WAKE_FAULTS,
    SimDriver,
    SimGpu,
    run_virtual,
    sim_unit,
)

GiB = 2**30
SLACK = 1.0  # a waiter is answered within max_wait plus one poll or so


def make(drivers: Iterable[SimDriver] | Iterable[Unit], *, coordinator: Coordinator | None = None,
         registry: CollectorRegistry | None = None, **gpu: object) -> Scheduler:
    """A scheduler over one 16 GiB device (unless `devices` is given), with sim drivers or ready units."""
    units = [d if isinstance(d, Unit) else sim_unit(d) for d in drivers]
    settings = {"max_wait": 30, "starvation_cap": 30, "nvml": False, **gpu}
    if "devices" not in settings:
        settings.setdefault("memory", 16 * GiB)
    scheduler = Scheduler(GpuConfig.model_validate(settings), units, coordinator or LocalCoordinator(),
                          SchedulerMetrics(registry or CollectorRegistry()))
    scheduler.poll_interval, scheduler.sweep_interval, scheduler.probe_timeout = 0.05, 0.5, 2.0
    return scheduler


def clock() -> float:
    return asyncio.get_running_loop().time()


async def request(scheduler: Scheduler, driver: SimDriver, hold: float = 0.0) -> str:
    """One request: acquire, serve for `hold` seconds, release; how it ended."""
    unit = scheduler.units[driver.name]
    asked = clock()
    try:
        await scheduler.acquire(unit)
    except QueueFull:
        return "queue-full"
    except BackendUnavailable:
        return "refused"
    finally:
        waited = clock() - asked
        assert waited <= scheduler.settings.max_wait + SLACK, f"{driver.name} waited {waited:.2f}s"
    try:
        await driver.serve(hold)
    finally:
        scheduler.release(unit)
    return "served"


async def at(delay: float, scheduler: Scheduler, driver: SimDriver, hold: float = 0.0) -> tuple[str, float]:
    """A request sent `delay` seconds from now: how it ended, and when it was answered."""
    await asyncio.sleep(delay)
    outcome = await request(scheduler, driver, hold)
    return outcome, round(clock() - hold, 6)


# --- the basics ---------------------------------------------------------------------------


def test_many_waiters_trigger_one_wake() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, b = SimDriver("a", gpu, memory=12 * GiB, wake_delay=0.05), SimDriver("b", gpu, memory=12 * GiB)
        scheduler = make([a, b])
        await scheduler.start()
        assert await asyncio.gather(*(request(scheduler, a, 0.001) for _ in range(50))) == ["served"] * 50
        assert a.wakes == 1
        await scheduler.close()

    run_virtual(main)


def test_alternating_backends_swap_each_time() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        chat, tts = SimDriver("vllm", gpu, memory=6 * GiB, sleeping=GiB), SimDriver("tts", gpu, memory=12 * GiB)
        scheduler = make([chat, tts])
        await scheduler.start()
        for _ in range(3):
            assert await request(scheduler, chat) == "served"
            assert await request(scheduler, tts) == "served"
        assert (chat.wakes, chat.sleeps, tts.wakes, tts.sleeps) == (3, 3, 3, 2)
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_a_unit_larger_than_the_device_is_refused_at_once() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        big = SimDriver("big", gpu, memory=17 * GiB)
        scheduler = make([big])
        await scheduler.start()
        assert await at(0, scheduler, big) == ("refused", 0.0)
        assert gpu.violations == [] and big.wakes == 0
        await scheduler.close()

    run_virtual(main)


def test_budget_gauges_have_samples_from_start() -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        awake = SimDriver("awake", gpu, memory=6 * GiB, holding=True)
        scheduler = make([awake, SimDriver("asleep", gpu, memory=4 * GiB, sleeping=GiB)], registry=registry)
        assert registry.get_sample_value("synapse_gpu_budget_bytes", {"device": "gpu0"}) == 16 * GiB
        await scheduler.start()
        assert registry.get_sample_value("synapse_gpu_budget_used_bytes", {"device": "gpu0"}) == 7 * GiB
        await scheduler.close()

    run_virtual(main)


# --- policy: each of these fails if the scheduler ignores the setting -----------------------


def test_max_queue_refuses_the_excess_at_once() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        slow = SimDriver("slow", gpu, memory=8 * GiB, wake_delay=1.0)
        scheduler = make([slow], max_queue=3)
        await scheduler.start()
        answers = await asyncio.gather(*(at(0, scheduler, slow) for _ in range(6)))
        assert sorted(answers) == [("queue-full", 0.0)] * 3 + [("served", 1.0)] * 3
        await scheduler.close()

    run_virtual(main)


def test_lower_priority_is_evicted_before_the_least_recently_used() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        high, low, new = (SimDriver(n, gpu, memory=6 * GiB) for n in ("high", "low", "new"))
        scheduler = make([sim_unit(high, priority=5), sim_unit(low), sim_unit(new)])
        await scheduler.start()
        assert await request(scheduler, high) == "served"
        await asyncio.sleep(1)
        assert await request(scheduler, low) == "served"  # so `high` is the least recently used
        await asyncio.sleep(1)
        assert await request(scheduler, new) == "served"
        assert (high.holding, low.holding, new.holding) == (True, False, True)
        await scheduler.close()

    run_virtual(main)


def test_min_residency_keeps_a_unit_until_it_has_served_its_time() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, b = SimDriver("a", gpu, memory=10 * GiB), SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([sim_unit(a, min_residency=10), sim_unit(b)])
        await scheduler.start()
        assert await request(scheduler, a) == "served"
        woke_a = clock()
        outcome, answered = await at(1, scheduler, b)
        assert outcome == "served"
        assert answered - woke_a >= 10, "a was evicted before its min_residency"
        assert answered - woke_a < 10 + SLACK
        await scheduler.close()

    run_virtual(main)


def test_units_of_one_exclusive_group_are_never_resident_together() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, b, c = (SimDriver(n, gpu, memory=4 * GiB) for n in ("a", "b", "c"))
        scheduler = make([sim_unit(a, exclusive=["trainer"]), sim_unit(b, exclusive=["trainer"]), sim_unit(c)])
        await scheduler.start()
        for driver in (c, a, b):
            assert await request(scheduler, driver) == "served"
        assert (a.holding, b.holding, c.holding) == (False, True, True)  # room for all three, yet a went
        await scheduler.close()

    run_virtual(main)


def test_a_busy_unit_is_never_evicted() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, b = SimDriver("a", gpu, memory=10 * GiB), SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([a, b])
        await scheduler.start()
        long = asyncio.create_task(at(0, scheduler, a, hold=5))
        outcome, answered = await at(0.1, scheduler, b)
        assert outcome == "served" and 5 <= answered < 5 + SLACK  # only once a's request is done
        assert (await long)[0] == "served"
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_a_unit_kept_busy_is_drained_after_the_starvation_cap() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, b = SimDriver("a", gpu, memory=10 * GiB), SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([a, b], starvation_cap=2)
        await scheduler.start()
        b_served = asyncio.Event()

        async def keep_a_busy() -> int:  # overlapping requests: a is never idle on its own
            sent: list[asyncio.Task[tuple[str, float]]] = []
            while not b_served.is_set():
                sent.append(asyncio.create_task(at(0, scheduler, a, hold=0.3)))
                await asyncio.sleep(0.1)
            return [outcome for outcome, _ in await asyncio.gather(*sent)].count("served")

        busy = asyncio.create_task(keep_a_busy())
        await asyncio.sleep(0.5)
        outcome, answered = await at(0, scheduler, b)
        b_served.set()
        assert outcome == "served"
        assert answered < 0.5 + 2 + 0.3 + SLACK, "b starved behind a busy unit"
        assert await busy > 20  # a's requests are all served, before and after the drain
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_a_waking_unit_admits_nobody_until_it_is_awake() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        slow = SimDriver("slow", gpu, memory=8 * GiB, wake_delay=1.0)
        scheduler = make([slow])
        await scheduler.start()
        answers = await asyncio.gather(at(0, scheduler, slow), at(0.5, scheduler, slow))
        assert list(answers) == [("served", 1.0), ("served", 1.0)]
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_idle_units_are_put_to_sleep_after_their_idle_timeout() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=4 * GiB)
        scheduler = make([sim_unit(a, idle_timeout=5)])
        await scheduler.start()
        assert await request(scheduler, a) == "served"
        await asyncio.sleep(4)
        assert a.holding
        await asyncio.sleep(2)
        assert not a.holding and scheduler.units["a"].state is Residency.ASLEEP
        await scheduler.close()

    run_virtual(main)


# --- failures: whatever a driver raises, nothing dies, nobody hangs, nothing is under-counted ---


@pytest.mark.parametrize("fault", WAKE_FAULTS)
def test_a_failed_wake_refuses_at_once_and_its_memory_stays_counted(fault: str) -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=10 * GiB, wake_faults=[fault])
        b = SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([sim_unit(a, wake_timeout=5), sim_unit(b)])
        await scheduler.start()
        outcome, answered = await at(0, scheduler, a)
        assert outcome == "refused" and answered <= 5 + SLACK
        assert scheduler.used("gpu0") >= gpu.used, "the books count less than the device holds"
        assert await request(scheduler, b) == "served"  # a is made to sleep (or found asleep) first
        assert await request(scheduler, a) == "served"  # and a wakes once its fault is past
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


@pytest.mark.parametrize("fault", SLEEP_FAULTS)
def test_a_failed_eviction_is_retried_and_the_waiter_served(fault: str) -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=10 * GiB, sleep_faults=[fault])
        b = SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([sim_unit(a, wake_timeout=5), sim_unit(b)])
        await scheduler.start()
        assert await request(scheduler, a) == "served"
        outcome, answered = await at(0, scheduler, b)
        assert outcome == "served" and answered <= 5 + SLACK
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


@pytest.mark.parametrize("fault", PROBE_FAULTS)
def test_start_survives_any_probe_failure_and_counts_the_unit_in_full(fault: str) -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=10 * GiB, holding=True, probe_faults=[fault])
        b = SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([a, b])
        await asyncio.wait_for(scheduler.start(), timeout=scheduler.probe_timeout + 1)
        assert scheduler.units["a"].state is Residency.UNKNOWN
        assert scheduler.used("gpu0") == 10 * GiB
        assert await request(scheduler, b) == "served"
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_start_asks_every_unit_at_once_and_each_for_a_bounded_time() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        slow = [SimDriver(f"slow{i}", gpu, memory=GiB, probe_delay=1.0) for i in range(5)]
        scheduler = make([*slow, SimDriver("stuck", gpu, memory=GiB, probe_faults=["hang"])])
        await asyncio.wait_for(scheduler.start(), timeout=10)
        assert clock() == pytest.approx(scheduler.probe_timeout)
        await scheduler.close()

    run_virtual(main)


@pytest.mark.parametrize("fault", SLEEP_FAULTS)
def test_the_idle_sweeper_survives_a_failed_sleep(fault: str) -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=4 * GiB, sleep_faults=[fault])
        scheduler = make([sim_unit(a, idle_timeout=2, wake_timeout=5)])
        await scheduler.start()
        for _ in range(2):
            assert await request(scheduler, a) == "served"
            await asyncio.sleep(20)
            assert not a.holding, "an idle unit stayed resident: the sweeper is gone"
        await scheduler.close()

    run_virtual(main)


def test_a_sleep_whose_answer_is_lost_reports_what_the_backend_says() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=4 * GiB, sleep_faults=["after"])
        scheduler = make([a])
        await scheduler.start()
        assert await request(scheduler, a) == "served"
        await scheduler.sleep(scheduler.units["a"])
        assert scheduler.units["a"].state is Residency.ASLEEP and not a.holding
        await scheduler.close()

    run_virtual(main)


def test_a_failed_operator_sleep_answers_bad_gateway_and_keeps_counting() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=4 * GiB, sleep_faults=["disconnect"])
        scheduler = make([a])
        await scheduler.start()
        assert await request(scheduler, a) == "served"
        with pytest.raises(BadGateway):
            await scheduler.sleep(scheduler.units["a"])
        assert a.holding and scheduler.used("gpu0") == 4 * GiB
        assert await request(scheduler, a) == "served"
        await scheduler.close()

    run_virtual(main)


def test_sleeping_a_busy_or_always_on_unit_is_a_conflict() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, pinned = SimDriver("a", gpu, memory=4 * GiB), SimDriver("pinned", gpu, memory=4 * GiB, always_on=True)
        scheduler = make([a, pinned])
        await scheduler.start()
        busy = asyncio.create_task(request(scheduler, a, hold=5))
        await asyncio.sleep(1)
        for unit in (scheduler.units["a"], scheduler.units["pinned"]):
            with pytest.raises(Conflict) as refused:
                await scheduler.sleep(unit)
            assert (refused.value.status, refused.value.code) == (409, "backend_busy")
        assert await busy == "served" and gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_operator_actions_ask_the_backend_not_stale_books() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=4 * GiB)
        scheduler = make([a])
        await scheduler.start()
        unit = scheduler.units["a"]
        await behind_the_back(a, awake=True)  # as another replica would, unseen by this one
        await scheduler.sleep(unit)
        assert not a.holding and a.sleeps == 1 and scheduler.status()[0]["state"] == "asleep"
        await scheduler.wake(unit)
        await behind_the_back(a, awake=False)
        await scheduler.wake(unit)
        assert a.awake and a.wakes == 3 and scheduler.status()[0]["state"] == "resident"
        await scheduler.close()

    run_virtual(main)


async def behind_the_back(driver: SimDriver, *, awake: bool) -> None:
    await (driver.wake() if awake else driver.sleep())


# --- no waiting while holding the device (F6) ------------------------------------------------


def test_an_impossible_fit_is_refused_at_once() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=10 * GiB)
        pinned = SimDriver("pinned", gpu, memory=6 * GiB, always_on=True)
        vl = SimDriver("vl", gpu, memory=6 * GiB)
        scheduler = make([pinned, vl], memory=10 * GiB)
        await scheduler.start()
        assert await at(0, scheduler, vl) == ("refused", 0.0)
        assert gpu.violations == [] and vl.wakes == 0
        await scheduler.close()

    run_virtual(main)


def test_waiting_for_room_leaves_the_device_free_and_stops_with_its_last_waiter() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a, b = SimDriver("a", gpu, memory=10 * GiB), SimDriver("b", gpu, memory=10 * GiB)
        scheduler = make([a, b], max_wait=60)
        await scheduler.start()
        busy = asyncio.create_task(request(scheduler, a, hold=100))
        waiting = asyncio.create_task(at(0.1, scheduler, b))
        await asyncio.sleep(1)
        async with asyncio.timeout(0.5):  # an operator, the sweeper or another replica can act meanwhile
            async with scheduler.coordinator.lease("gpu0"):
                pass
        waiting.cancel()
        await asyncio.sleep(1)
        bringing_in = scheduler.units["b"].bringing_in
        assert bringing_in is not None and bringing_in.done(), "still trying for a waiter that left"
        busy.cancel()
        await asyncio.gather(busy, waiting, return_exceptions=True)
        await scheduler.close()

    run_virtual(main)


# --- a lease lost in the middle of a wake (F15) -------------------------------------------


class LosingCoordinator(LocalCoordinator):
    """Loses a device's lease on demand, as a replica does when Redis stalls and another takes over."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, Lease] = {}
        self.refuse_resident = 0

    @asynccontextmanager
    async def lease(self, device: str) -> AsyncIterator[Lease]:
        async with super().lease(device) as lease:
            self.held[device] = lease
            yield lease

    def lose(self, device: str) -> None:
        self._counter += 1
        self._newest[device] = self._counter  # someone else's token is now the newest
        self.held[device].lost.set()

    async def publish(self, unit: str, state: dict[str, Any], token: int) -> None:
        if state["state"] == "resident" and self.refuse_resident:
            self.refuse_resident -= 1
            raise StaleToken(unit, token)
        await super().publish(unit, state, token)


def test_a_wake_abandoned_when_the_lease_is_lost_is_taken_up_again() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=10 * GiB, wake_delay=10)
        coordinator = LosingCoordinator()
        scheduler = make([a], coordinator=coordinator)
        await scheduler.start()
        asyncio.get_running_loop().call_later(1, coordinator.lose, "gpu0")
        outcome, answered = await at(0, scheduler, a)
        assert outcome == "served" and 11 <= answered < 11 + SLACK  # abandoned at 1s, woken again
        assert (await coordinator.snapshot())["a"]["state"] == "resident"
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_a_wake_whose_publish_is_refused_is_verified_and_published_again() -> None:
    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=10 * GiB)
        coordinator = LosingCoordinator()
        coordinator.refuse_resident = 1
        scheduler = make([a], coordinator=coordinator)
        await scheduler.start()
        assert await request(scheduler, a) == "served"
        assert (await coordinator.snapshot())["a"]["state"] == "resident"
        assert gpu.violations == []
        await scheduler.close()

    run_virtual(main)


def test_close_stops_the_scheduler_and_closes_the_coordinator() -> None:
    class Closing(LocalCoordinator):
        closed = 0

        async def close(self) -> None:
            self.closed += 1

    async def main() -> None:
        gpu = SimGpu(capacity=16 * GiB)
        a = SimDriver("a", gpu, memory=4 * GiB, wake_delay=5)
        coordinator = Closing()
        scheduler = make([a], coordinator=coordinator)
        await scheduler.start()
        waiting = asyncio.create_task(at(0, scheduler, a))
        await asyncio.sleep(1)
        await scheduler.close()
        assert (await waiting)[0] == "refused"  # answered, not left hanging
        await scheduler.close()
        assert coordinator.closed == 2

    run_virtual(main)


# --- the property: random units, policies, requests, cancellations and faults ---------------


@dataclass
class Planned:
    """One unit of a scenario, as drawn: the model below judges it from this alone."""

    device: int
    memory: int
    sleeping: int
    always_on: bool
    awake_at_start: bool
    lifecycle: dict[str, object]
    wake_faults: list[str]
    sleep_faults: list[str]
    probe_faults: list[str]

    @property
    def faulty(self) -> bool:
        return bool(self.wake_faults or self.sleep_faults or self.probe_faults)


def feasible(plan: list[Planned], index: int, capacity: int) -> bool:
    """The model: whether a unit can ever be resident, from the configuration alone."""
    unit = plan[index]
    others = [p for i, p in enumerate(plan) if i != index and p.device == unit.device]
    pinned = sum(p.memory for p in others if p.always_on)
    asleep = sum(p.sleeping for p in others if not p.always_on)
    groups = set(unit.lifecycle.get("exclusive", []))  # type: ignore[call-overload]
    blocked = any(p.always_on and groups & set(p.lifecycle.get("exclusive", [])) for p in others)  # type: ignore[call-overload]
    return not blocked and pinned + asleep + unit.memory <= capacity


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Planned], list[tuple[int, float, float, float | None]]]:
    devices = draw(st.integers(1, 2))
    capacity = 16 * GiB
    plan: list[Planned] = []
    held = [0] * devices
    for _ in range(draw(st.integers(2, 6))):
        device = draw(st.integers(0, devices - 1))
        memory = draw(st.integers(1, 17)) * GiB
        sleeping = draw(st.sampled_from([0, GiB // 4])) if memory > GiB else 0
        sleeping = sleeping if held[device] + sleeping <= capacity else 0  # what asleep units hold must fit
        always_on = draw(st.sampled_from([False] * 5 + [True])) and held[device] + memory <= capacity
        awake = always_on or (draw(st.booleans()) and held[device] + memory <= capacity)
        held[device] += memory if awake else sleeping
        faults = not always_on and draw(st.booleans())
        plan.append(Planned(
            device, memory, sleeping, always_on, awake,
            {"priority": draw(st.integers(0, 2)), "exclusive": draw(st.sampled_from([[], [], ["x"]])),
             "min_residency": draw(st.sampled_from([0, 0, 2])), "idle_timeout": draw(st.sampled_from([None, 3])),
             "wake_timeout": 3, "device": f"gpu{device}"},
            draw(st.lists(st.sampled_from(WAKE_FAULTS), max_size=2)) if faults else [],
            draw(st.lists(st.sampled_from(SLEEP_FAULTS), max_size=2)) if faults else [],
            draw(st.lists(st.sampled_from(PROBE_FAULTS), max_size=1)) if faults else [],
        ))
    requests = draw(st.lists(st.tuples(st.integers(0, len(plan) - 1), st.floats(0, 5), st.floats(0, 1),
                                       st.none() | st.floats(0, 3)), min_size=1, max_size=30))
    return devices, plan, requests


@settings(max_examples=80, deadline=None)
@given(scenario=scenarios())
def test_budget_holds_and_every_waiter_is_answered(
        scenario: tuple[int, list[Planned], list[tuple[int, float, float, float | None]]]) -> None:
    devices, plan, requests = scenario
    capacity = 16 * GiB

    async def main() -> None:
        gpus = [SimGpu(capacity=capacity) for _ in range(devices)]
        drivers = [SimDriver(f"u{i}", gpus[p.device], memory=p.memory, sleeping=p.sleeping, always_on=p.always_on,
                             holding=p.awake_at_start, wake_faults=list(p.wake_faults),
                             sleep_faults=list(p.sleep_faults), probe_faults=list(p.probe_faults))
                   for i, p in enumerate(plan)]
        scheduler = make([sim_unit(d, **p.lifecycle) for d, p in zip(drivers, plan, strict=True)],
                         devices=[{"name": f"gpu{i}", "memory": capacity, "index": i} for i in range(devices)],
                         max_wait=120, starvation_cap=5)
        scheduler.poll_interval = 0.25
        await scheduler.start()

        async def send(index: int, delay: float, hold: float, cancel: float | None) -> str:
            task = asyncio.create_task(at(delay, scheduler, drivers[index], hold))
            if cancel is not None:
                asyncio.get_running_loop().call_later(delay + cancel, task.cancel)
            try:
                return (await task)[0]
            except asyncio.CancelledError:
                return "cancelled"

        outcomes = await asyncio.wait_for(asyncio.gather(*(send(*r) for r in requests)), timeout=600)
        for gpu in gpus:
            assert gpu.violations == []
        for device, gpu in enumerate(gpus):
            assert scheduler.used(f"gpu{device}") >= gpu.used, "the books count less than the device holds"
        assert all(u.in_flight == 0 and not u.waited_for() for u in scheduler.units.values())
        for (index, *_), outcome in zip(requests, outcomes, strict=True):
            if outcome != "cancelled" and not plan[index].faulty and feasible(plan, index, capacity):
                assert outcome == "served", f"u{index} was {outcome} though it can fit and never failed"
        await scheduler.close()
        assert all(gpu.violations == [] for gpu in gpus)

    run_virtual(main)
