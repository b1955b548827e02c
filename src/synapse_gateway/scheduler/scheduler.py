"""Decides which units are resident: wakes what a request needs, evicts idle units to make room.

The invariant, always: on each device, the memory held by its units never exceeds the budget. A unit
counts only its sleeping memory once its sleep is confirmed; waking, going to sleep, or in doubt after
an action failed (UNKNOWN), it counts in full until its driver says it is asleep. Lifecycle actions on
one device are serialized by the coordinator's lease (a lock in one process, a Redis lease across
replicas); nothing waits for room while holding it, and every driver call is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from ..config.schema import DeviceConfig, GpuConfig
from .actions import Actions
from .admin import Admin
from .admission import Admission
from .coordination import Coordinator, LocalCoordinator
from .failures import NoRoom, QueueFull, log_failure
from .in_flight import InFlightReports
from .intake import Intake
from .ledger import Ledger
from .metrics import SchedulerMetrics
from .nvml import DeviceMemory
from .sweeper import Sweeper
from .units import Residency, Unit, now

__all__ = ["NoRoom", "QueueFull", "Scheduler"]

log = logging.getLogger("synapse.scheduler")


class Scheduler:
    """Acquire a unit before dispatching to it and release it after; the scheduler does the rest."""

    # How often a blocked wake re-checks for room, how often idle units are swept, and how long one
    # residency question may take; a simulation that runs time faster scales them down. Its parts
    # read them from here at each use, so setting them on a built scheduler takes effect.
    poll_interval = 0.25
    sweep_interval = 1.0
    probe_timeout = 10.0

    def __init__(self, settings: GpuConfig, units: Iterable[Unit], coordinator: Coordinator,
                 metrics: SchedulerMetrics) -> None:
        self.settings = settings
        self.devices: dict[str, DeviceConfig] = {d.name: d for d in settings.device_list()}
        self.units: dict[str, Unit] = {}
        self.coordinator = coordinator
        self.metrics = metrics
        self.shared = not isinstance(coordinator, LocalCoordinator)
        self.device_memory = DeviceMemory(list(self.devices.values()), settings.nvml)
        self._idle_task: asyncio.Task[None] | None = None
        self._ledger = Ledger(self.devices, self.units, metrics)
        self._reports = InFlightReports(coordinator)
        # The real-memory check is looked up on this scheduler at each wake, so that it (and its
        # patience) can be replaced on a built scheduler.
        self._actions = Actions(self._ledger, coordinator, metrics, self,
                                real_memory=lambda unit: self._await_real_memory(unit))
        self._intake = Intake(settings, self._ledger, self._actions, self._reports, coordinator, self,
                              shared=self.shared)
        self._admission = Admission(settings, self._ledger, self._intake, self._reports, coordinator, metrics,
                                    shared=self.shared)
        self._admin = Admin(self._ledger, self._actions, self._intake, self._admission, coordinator)
        self._sweeper = Sweeper(self._ledger, self._actions, self._intake, coordinator,
                                device_memory=self.device_memory, metrics=metrics, pace=self)
        for unit in units:
            self.add(unit)
        for device in self.devices:
            self._ledger.budget(device)

    def add(self, unit: Unit) -> None:
        """Schedule `unit`; one added after start may already hold memory, so it counts in full until asked."""
        if unit.device not in self.devices:
            raise ValueError(f"unit {unit.key} names device {unit.device!r}; devices: {sorted(self.devices)}")
        self.units[unit.key] = unit
        if self._idle_task is not None:
            self._ledger.set(unit, Residency.UNKNOWN)

    def used(self, device: str) -> int:
        return self._ledger.used(device)

    def capacity(self, device: str) -> int:
        return self._ledger.capacity(device)

    async def start(self) -> None:
        """Learn each unit's residency from its backend (all at once, each bounded), and start the sweeper."""
        await asyncio.gather(*(self._actions.probe(unit) for unit in self.units.values()))
        for device in self.devices:
            if self.used(device) > self.capacity(device):
                log.warning("device %s is over its budget at start-up (%d > %d bytes); evicting idle units",
                            device, self.used(device), self.capacity(device))
                try:
                    async with self.coordinator.lease(device) as lease:
                        await self._actions.sync(device)
                        await self._intake.make_room(device, None, lease, drain=False)
                except Exception as exc:  # start-up goes on: the sweeper and later wakes retry
                    log_failure(f"evicting on device {device} at start-up", exc)
        self._idle_task = asyncio.create_task(self._sweeper.run(), name="synapse-idle-sweeper")

    async def stop(self) -> None:
        """Stop sweeping and waking; anyone still waiting is answered 503."""
        self._admission.close()
        tasks = [t for u in self.units.values() for t in (u.bringing_in, u.confirming) if t is not None]
        tasks += [self._idle_task] if self._idle_task is not None else []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._reports.pending, return_exceptions=True)
        self.device_memory.close()

    async def close(self) -> None:
        """`stop`, then withdraw from the other replicas and close the coordinator (safe to call twice)."""
        if self._idle_task is None or not self._idle_task.done():
            await self.stop()
        await self.coordinator.close()

    async def acquire(self, unit: Unit) -> None:
        """Return when `unit` is resident with this request counted in flight; 503 when it cannot be."""
        await self._admission.acquire(unit)

    def must_wait(self, unit: Unit) -> bool:
        """Whether `acquire` would have to wait (the unit is not resident, or is draining)."""
        return unit.state is not Residency.RESIDENT or unit.draining

    def release(self, unit: Unit) -> None:
        self._admission.release(unit)

    async def wake(self, unit: Unit) -> None:
        """Admin: make `unit` resident now (no request is counted); the backend's own answer decides."""
        await self._admin.wake(unit)

    async def sleep(self, unit: Unit) -> None:
        """Admin: put `unit` to sleep now, if nothing is in flight on it (409 otherwise)."""
        await self._admin.sleep(unit)

    async def _await_real_memory(self, unit: Unit, patience: float = 10.0) -> None:
        """Where NVML reads the device, refuse a wake that would not fit the memory really free there.

        A process that just slept may take a moment to hand its memory back, hence the patience.
        """
        needed = unit.memory - unit.held()
        deadline = now() + patience
        while (free := self.device_memory.free(unit.device)) is not None and free < needed:
            if now() > deadline:
                raise NoRoom(f"device {unit.device} has {free / 2**30:.1f} GiB really free; {unit.key} "
                             f"needs {needed / 2**30:.1f} GiB more (something outside Synapse uses the GPU?)")
            await asyncio.sleep(self.poll_interval)

    def status(self) -> list[dict[str, Any]]:
        at = now()
        return [{"unit": u.key, "backend": u.backend, "device": u.device, "driver": u.config.driver,
                 "state": str(u.state), "memory_held": u.held(), "memory_resident": u.memory,
                 "idle_s": round(u.idle_for(at), 1), "in_flight": u.in_flight, "queue": len(u.waiters),
                 "priority": u.config.priority}
                for u in self.units.values()]
