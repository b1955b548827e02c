"""Decides which units are resident: wakes what a request needs, evicts idle units to make room.

The invariant, always: on each device, the memory held by its units never exceeds the budget. A unit
that is waking or going to sleep counts in full; only an asleep unit counts its sleeping memory.
Lifecycle actions on one device are serialized by the coordinator's lease (a lock in one process,
a Redis lease across replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from ..config.schema import DeviceConfig, GpuConfig
from ..errors import BackendUnavailable, GatewayError
from .coordination import CoordinationError, Coordinator, Lease, LocalCoordinator
from .drivers.base import LifecycleError, WakeFailed
from .metrics import SchedulerMetrics
from .nvml import DeviceMemory
from .units import Residency, Unit

log = logging.getLogger("synapse.scheduler")


class QueueFull(BackendUnavailable):
    code = "queue_full"


class Scheduler:
    """Acquire a unit before dispatching to it and release it after; the scheduler does the rest."""

    # How often a blocked wake re-checks for room, and how often idle units are swept; a simulation
    # that runs time faster scales them down.
    poll_interval = 0.25
    sweep_interval = 1.0

    def __init__(self, settings: GpuConfig, units: Iterable[Unit], coordinator: Coordinator,
                 metrics: SchedulerMetrics) -> None:
        self.settings = settings
        self.devices: dict[str, DeviceConfig] = {d.name: d for d in settings.device_list()}
        self.units: dict[str, Unit] = {}
        self.coordinator = coordinator
        self.metrics = metrics
        self._changed: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self.devices}
        self._idle_task: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self.shared = not isinstance(coordinator, LocalCoordinator)
        self.device_memory = DeviceMemory(list(self.devices.values()), settings.nvml)
        for unit in units:
            self.add(unit)

    def add(self, unit: Unit) -> None:
        if unit.device not in self.devices:
            raise ValueError(f"unit {unit.key} names device {unit.device!r}; devices: {sorted(self.devices)}")
        self.units[unit.key] = unit

    def used(self, device: str) -> int:
        return sum(u.held() for u in self.units.values() if u.device == device)

    def capacity(self, device: str) -> int:
        return self.devices[device].capacity

    async def start(self) -> None:
        """Learn each unit's residency from its backend, and start the idle sweeper."""
        for unit in self.units.values():
            try:
                resident = await unit.driver.is_resident()
            except (LifecycleError, OSError) as exc:
                log.warning("cannot tell whether %s is resident (%s); counting it as resident", unit.key, exc)
                resident = True
            if resident:
                unit.state, unit.resident_since = Residency.RESIDENT, time.monotonic()
            unit.touch()
            self.metrics.state(unit)
        for device in self.devices:
            if self.used(device) > self.capacity(device):
                log.warning("device %s is over its budget at start-up (%d > %d bytes); evicting idle units",
                            device, self.used(device), self.capacity(device))
                async with self.coordinator.lease(device) as lease:
                    await self._sync(device)
                    await self._make_room(device, None, lease)
        self._idle_task = asyncio.create_task(self._sweep_idle(), name="synapse-idle-sweeper")

    async def stop(self) -> None:
        self.device_memory.close()
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)
        for unit in self.units.values():
            if unit.bringing_in is not None:
                unit.bringing_in.cancel()

    async def acquire(self, unit: Unit) -> None:
        """Return when `unit` is resident with this request counted in flight; 503 when it cannot be."""
        if unit.state is Residency.RESIDENT and not unit.draining and await self._admit(unit):
            return
        if len(unit.waiters) >= self.settings.max_queue:
            raise QueueFull(f"{len(unit.waiters)} requests are already waiting for {unit.key}", retry_after=5)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        unit.waiters.append(future)
        self.metrics.queue(unit)
        if unit.bringing_in is None or unit.bringing_in.done():
            unit.bringing_in = asyncio.create_task(self._bring_in(unit), name=f"wake-{unit.key}")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.max_wait):
                await asyncio.shield(future)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                return  # handed over just as the wait ran out
            raise BackendUnavailable(f"{unit.key} did not become resident within {self.settings.max_wait:g}s",
                                     retry_after=30) from None
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(unit)  # woken for us, but we are gone
            raise
        finally:
            if future in unit.waiters:
                unit.waiters.remove(future)
            self.metrics.queue(unit, waited=time.monotonic() - started)

    async def _admit(self, unit: Unit) -> bool:
        """The fast path: count the request in flight on a resident unit (checked once across replicas)."""
        unit.in_flight += 1
        unit.touch()
        if not self.shared:
            if unit.in_flight == 1:
                self._report(unit)
            return True
        if unit.confirmed:
            return True
        if unit.confirming is None or unit.confirming.done():
            unit.confirming = asyncio.create_task(self._still_resident_everywhere(unit))
        try:
            confirmed = await asyncio.shield(unit.confirming)
        except BaseException:
            self.release(unit)
            raise
        if not confirmed:
            self.release(unit)  # not resident after all: wait for it like everyone else
        return confirmed

    async def _still_resident_everywhere(self, unit: Unit) -> bool:
        """First request on this replica: announce it, then check no other replica began evicting the unit.

        An evicting replica marks the unit sleeping before it reads the in-flight counts, so either it
        sees this replica's count (and keeps the unit), or this replica sees its mark (and waits).
        """
        await self._write_in_flight(unit)
        record = (await self.coordinator.snapshot()).get(unit.key)
        if record is None or record.get("state") == str(Residency.RESIDENT):
            unit.confirmed = unit.in_flight > 0
            return True
        unit.state = Residency.ASLEEP  # another replica changed its residency; the slow path syncs
        self.metrics.state(unit)
        return False

    def must_wait(self, unit: Unit) -> bool:
        """Whether `acquire` would have to wait (the unit is not resident, or is draining)."""
        return unit.state is not Residency.RESIDENT or unit.draining

    def release(self, unit: Unit) -> None:
        unit.in_flight -= 1
        unit.touch()
        if unit.in_flight == 0:
            unit.confirmed = False  # idle here: another replica may now evict it
            self._changed[unit.device].set()
            self._report(unit)

    def _report(self, unit: Unit) -> None:
        """Tell other replicas when a unit starts or stops being in use here (they must not evict it)."""
        task = asyncio.create_task(self._write_in_flight(unit))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _write_in_flight(self, unit: Unit) -> None:
        """Reports are serialized per unit and send the count as it is when written, never a stale one."""
        async with unit.report_lock:
            await self.coordinator.report_in_flight(unit.key, unit.in_flight)

    async def wake(self, unit: Unit) -> None:
        """Admin: make `unit` resident now (no request is counted)."""
        await self.acquire(unit)
        self.release(unit)

    async def sleep(self, unit: Unit) -> None:
        """Admin: put `unit` to sleep now, if nothing is in flight on it."""
        async with self.coordinator.lease(unit.device) as lease:
            if unit.state is not Residency.RESIDENT:
                return
            if unit.in_flight or await self.coordinator.in_flight_elsewhere(unit.key):
                raise GatewayError(f"{unit.key} has requests in flight; it sleeps once they are done",
                                   code="backend_busy")
            if not await self._evict(unit, lease, reason="asked to"):
                raise GatewayError(f"{unit.key} is in use on another replica", code="backend_busy")

    async def _bring_in(self, unit: Unit) -> None:
        try:
            async with self.coordinator.lease(unit.device) as lease:
                await self._sync(unit.device)
                if unit.state is not Residency.RESIDENT:
                    await self._make_room(unit.device, unit, lease)
                    await self._wake(unit, lease)
                # Hand it over and announce the count before the lease goes, or another replica
                # could take the lease and evict the unit under the requests just dispatched.
                self._dispatch(unit)
                if self.shared:
                    await self._write_in_flight(unit)
                    unit.confirmed = unit.in_flight > 0
        except (LifecycleError, GatewayError, CoordinationError, OSError) as exc:
            self._fail_waiters(unit, exc)
        finally:
            self._undrain(unit.device)

    def _dispatch(self, unit: Unit) -> None:
        """Hand the unit to everyone waiting: counted in flight before they run, so it can't be evicted."""
        before = unit.in_flight
        while unit.waiters:
            future = unit.waiters.popleft()
            if not future.done():
                unit.in_flight += 1
                future.set_result(None)
        unit.touch()
        if before == 0 and unit.in_flight:
            self._report(unit)

    def _fail_waiters(self, unit: Unit, exc: BaseException) -> None:
        error = exc if isinstance(exc, GatewayError) else BackendUnavailable(str(exc), retry_after=10)
        while unit.waiters:
            future = unit.waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def _undrain(self, device: str) -> None:
        for other in self.units.values():
            if other.device == device and other.draining and other.state is Residency.RESIDENT:
                other.draining = False
                self._dispatch(other)

    async def _sync(self, device: str) -> None:
        """Adopt the states other replicas published: under the lease, the shared table is the truth."""
        table = await self.coordinator.snapshot()
        for unit in self.units.values():
            record = table.get(unit.key)
            if unit.device != device or record is None:
                continue
            state = Residency(record["state"])
            if state is not unit.state and state in (Residency.RESIDENT, Residency.ASLEEP):
                unit.state = state
                unit.resident_since = time.monotonic() if state is Residency.RESIDENT else unit.resident_since
                self.metrics.state(unit)

    async def _wake(self, unit: Unit, lease: Lease) -> None:
        lease.check()
        token = lease.token
        if unit.memory > self.capacity(unit.device):
            raise WakeFailed(f"{unit.key} needs {unit.memory} bytes; device {unit.device} has "
                             f"{self.capacity(unit.device)}")
        await self._await_real_memory(unit)
        unit.state = Residency.WAKING
        await self._publish(unit, token)
        started = time.monotonic()
        try:
            async with asyncio.timeout(unit.config.wake_timeout):
                await unit.driver.wake()
        except (LifecycleError, TimeoutError, OSError) as exc:
            unit.state = Residency.ASLEEP
            await self._publish(unit, token)
            log.error("waking %s failed: %s", unit.key, exc or "timed out")
            raise WakeFailed(f"waking {unit.key} failed: {exc or 'timed out'}") from exc
        unit.state, unit.resident_since = Residency.RESIDENT, time.monotonic()
        await self._publish(unit, token)
        self.metrics.swap(unit, "wake", time.monotonic() - started)
        log.info("%s is resident (woke in %.2fs; device %s uses %d of %d bytes)", unit.key,
                 time.monotonic() - started, unit.device, self.used(unit.device), self.capacity(unit.device))

    async def _await_real_memory(self, unit: Unit, patience: float = 10.0) -> None:
        """Where NVML reads the device, refuse a wake that would not fit the memory really free there.

        A process that just slept may take a moment to hand its memory back, hence the patience.
        """
        needed = unit.memory - unit.held()
        deadline = time.monotonic() + patience
        while (free := self.device_memory.free(unit.device)) is not None and free < needed:
            if time.monotonic() > deadline:
                raise WakeFailed(f"device {unit.device} has {free / 2**30:.1f} GiB really free; {unit.key} "
                                 f"needs {needed / 2**30:.1f} GiB more (something outside Synapse uses the GPU?)")
            await asyncio.sleep(self.poll_interval)

    async def _evict(self, victim: Unit, lease: Lease, *, reason: str) -> bool:
        """Put `victim` to sleep; False when another replica turned out to be using it (it stays)."""
        lease.check()
        token = lease.token
        if victim.in_flight or victim.state is not Residency.RESIDENT:  # a request got in while we looked
            return False
        victim.state, victim.confirmed = Residency.SLEEPING, False  # new requests here queue from now on
        await self._publish(victim, token)
        if await self.coordinator.in_flight_elsewhere(victim.key):
            victim.state = Residency.RESIDENT
            await self._publish(victim, token)
            return False
        started = time.monotonic()
        try:
            async with asyncio.timeout(victim.config.wake_timeout):
                await victim.driver.sleep()
        except (LifecycleError, TimeoutError, OSError) as exc:
            victim.state = Residency.RESIDENT  # its memory is still held
            await self._publish(victim, token)
            raise LifecycleError(f"putting {victim.key} to sleep failed: {exc or 'timed out'}") from exc
        victim.state, victim.draining = Residency.ASLEEP, False
        await self._publish(victim, token)
        self.metrics.swap(victim, "sleep", time.monotonic() - started)
        log.info("%s is asleep (%s, in %.2fs)", victim.key, reason, time.monotonic() - started)
        if victim.waiters and (victim.bringing_in is None or victim.bringing_in.done()):
            victim.bringing_in = asyncio.create_task(self._bring_in(victim), name=f"wake-{victim.key}")
        return True

    async def _make_room(self, device: str, unit: Unit | None, lease: Lease) -> None:
        """Evict idle units (lowest priority, least recently used first) until `unit` fits."""
        started = time.monotonic()
        while True:
            conflicts = self._conflicts(device, unit)
            if not conflicts and self._overflow(device, unit) <= 0:
                return
            victims = await self._eligible(conflicts or self._candidates(device, unit))
            if victims and await self._evict(victims[0], lease,
                                             reason=f"room for {unit.key}" if unit else "over budget"):
                continue
            if unit is not None and time.monotonic() - started > self.settings.starvation_cap:
                for busy in conflicts or self._candidates(device, unit):
                    busy.draining = True  # stop admitting to it, so it drains and can be evicted
            changed = self._changed[device]
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.poll_interval)

    def _overflow(self, device: str, unit: Unit | None) -> int:
        extra = 0 if unit is None else unit.memory - unit.held()
        return self.used(device) + extra - self.capacity(device)

    def _conflicts(self, device: str, unit: Unit | None) -> list[Unit]:
        """Units that must go for `unit` to come in: a shared exclusive group, or its slot group is full."""
        if unit is None:
            return []
        groups = set(unit.config.exclusive)
        found = [u for u in self._resident(device, unit) if groups & set(u.config.exclusive)]
        if unit.slot_group is not None:
            siblings = [u for u in self._resident(device, unit) if u.slot_group == unit.slot_group]
            if len(siblings) >= unit.slot_limit:
                found += sorted(siblings, key=lambda u: u.last_used)[:len(siblings) - unit.slot_limit + 1]
        return found

    def _resident(self, device: str, unit: Unit | None) -> list[Unit]:
        return [u for u in self.units.values()
                if u.device == device and u is not unit and u.state is Residency.RESIDENT]

    def _candidates(self, device: str, unit: Unit | None) -> list[Unit]:
        return sorted((u for u in self._resident(device, unit) if u.evictable),
                      key=lambda u: (u.config.priority, u.last_used))

    async def _eligible(self, units: list[Unit]) -> list[Unit]:
        now = time.monotonic()
        ready = [u for u in units if u.evictable and u.in_flight == 0 and u.settled_in(now)]
        return [u for u in ready if not await self.coordinator.in_flight_elsewhere(u.key)]

    async def _publish(self, unit: Unit, token: int) -> None:
        self.metrics.state(unit)
        self.metrics.budget(unit.device, self.used(unit.device), self.capacity(unit.device))
        await self.coordinator.publish(unit.key, {"state": str(unit.state), "memory": unit.held(),
                                                  "since": time.time()}, token)

    async def _sweep_idle(self) -> None:
        """Put units to sleep once they have been idle for their idle_timeout."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            for device in self.devices:
                used = self.device_memory.used(device)
                if used is not None:
                    self.metrics.device_bytes.labels(device).set(used)
            now = time.monotonic()
            for unit in list(self.units.values()):
                timeout = unit.config.idle_timeout
                if (timeout is None or unit.state is not Residency.RESIDENT or unit.in_flight
                        or unit.waiters or not unit.evictable or unit.idle_for(now) < timeout
                        or not unit.settled_in(now)):
                    continue
                try:
                    async with self.coordinator.lease(unit.device) as lease:
                        if unit.state is Residency.RESIDENT and unit.in_flight == 0 and not unit.waiters:
                            await self._evict(unit, lease, reason=f"idle for {timeout:g}s")
                except (LifecycleError, CoordinationError, OSError) as exc:
                    log.warning("idle sleep of %s failed: %s", unit.key, exc)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"unit": u.key, "backend": u.backend, "device": u.device, "driver": u.config.driver,
                 "state": str(u.state), "memory_held": u.held(), "memory_resident": u.memory,
                 "idle_s": round(u.idle_for(now), 1), "in_flight": u.in_flight, "queue": len(u.waiters),
                 "priority": u.config.priority}
                for u in self.units.values()]
