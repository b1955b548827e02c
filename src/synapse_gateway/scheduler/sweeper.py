"""The idle sweeper: puts units to sleep once idle for their idle_timeout, and settles units in doubt."""

from __future__ import annotations

import asyncio
import logging

from . import placement
from .actions import Actions
from .coordination import Coordinator
from .failures import log_failure
from .intake import Intake
from .ledger import Ledger
from .metrics import SchedulerMetrics
from .nvml import DeviceMemory
from .pace import Pace
from .units import Residency, now


class Sweeper:
    """Sweeps every `sweep_interval`, acting on each unit under its device's lease."""

    def __init__(self, ledger: Ledger, actions: Actions, intake: Intake, coordinator: Coordinator, *,
                 device_memory: DeviceMemory, metrics: SchedulerMetrics, pace: Pace) -> None:
        self.ledger = ledger
        self.actions = actions
        self.intake = intake
        self.coordinator = coordinator
        self.device_memory = device_memory
        self.metrics = metrics
        self.pace = pace
        self.doubt_checked: dict[str, float] = {}  # when each unit in doubt may be asked again

    async def run(self) -> None:
        """Put units to sleep once idle for their idle_timeout; settle units in doubt. It never dies."""
        while True:
            await asyncio.sleep(self.pace.sweep_interval)
            try:
                await self.once()
            except Exception as exc:
                log_failure("the idle sweep", exc)

    async def once(self) -> None:
        for device in self.ledger.devices:
            used = self.device_memory.used(device)
            if used is not None:
                self.metrics.device_bytes.labels(device).set(used)
        for unit in list(self.ledger.units.values()):
            at = now()
            doubt = placement.in_doubt(unit) and at >= self.doubt_checked.get(unit.key, 0.0)
            if not (doubt or placement.idle(unit, at)):
                continue
            if doubt:  # a backend that cannot answer is asked again only every few sweeps
                self.doubt_checked[unit.key] = at + 10 * self.pace.sweep_interval
            try:
                async with self.coordinator.lease(unit.device) as lease:
                    await self.actions.sync(unit.device)
                    if doubt and placement.in_doubt(unit) and await self.actions.ask(unit) is False:
                        self.ledger.set(unit, Residency.ASLEEP)
                        await self.actions.publish(unit, lease)
                    elif placement.idle(unit, now()):
                        await self.intake.evict(unit, lease, reason=f"idle for {unit.config.idle_timeout:g}s")
            except Exception as exc:
                log_failure(f"idle sleep of {unit.key}", exc, level=logging.WARNING)
