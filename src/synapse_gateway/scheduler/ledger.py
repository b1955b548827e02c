"""This replica's books: each unit's residency, what it holds against its device's budget, and when room frees."""

from __future__ import annotations

import asyncio

from ..config.schema import DeviceConfig
from .metrics import SchedulerMetrics
from .units import Residency, Unit


class Ledger:
    """The units by key and the devices by name, shared with the `Scheduler`; every state change goes through `set`."""

    def __init__(self, devices: dict[str, DeviceConfig], units: dict[str, Unit], metrics: SchedulerMetrics) -> None:
        self.devices = devices
        self.units = units
        self.metrics = metrics
        # Set when a device may have room again (a unit fell asleep or went idle); blocked wakes wait on it.
        self.changed: dict[str, asyncio.Event] = {name: asyncio.Event() for name in devices}

    def on(self, device: str) -> list[Unit]:
        return [u for u in self.units.values() if u.device == device]

    def used(self, device: str) -> int:
        return sum(u.held() for u in self.on(device))

    def capacity(self, device: str) -> int:
        return self.devices[device].capacity

    def set(self, unit: Unit, state: Residency) -> None:
        unit.state = state
        self.metrics.state(unit)
        self.budget(unit.device)
        if state is Residency.ASLEEP:
            self.changed[unit.device].set()

    def budget(self, device: str) -> None:
        self.metrics.budget(device, self.used(device), self.capacity(device))
