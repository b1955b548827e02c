"""A simulated GPU and drivers for scheduler property tests: they check the invariants as they run.

They implement only our own LifecycleDriver interface, with random delays and injected failures; the
real drivers are tested against faithful fakes of vLLM, Ollama and Kubernetes elsewhere.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from synapse_gateway.config.schema import LifecycleConfig
from synapse_gateway.scheduler.drivers.base import SleepFailed, WakeFailed
from synapse_gateway.scheduler.units import Unit


@dataclass
class SimGpu:
    """The memory really in use on one device, and every violation seen."""

    capacity: int
    used: int = 0
    violations: list[str] = field(default_factory=list)

    def take(self, amount: int, who: str) -> None:
        self.used += amount
        if self.used > self.capacity:
            self.violations.append(f"{who} pushed the device to {self.used} > {self.capacity}")


@dataclass
class SimDriver:
    """A backend that holds `memory` while awake (and `sleeping` while asleep) and fails on command."""

    name: str
    gpu: SimGpu
    memory: int
    sleeping: int = 0
    wake_delay: float = 0.002
    resident: bool = False
    serving: int = 0
    fail_wakes: int = 0
    wakes: int = 0
    sleeps: int = 0

    async def is_resident(self) -> bool:
        return self.resident

    async def wake(self) -> None:
        self.gpu.take(self.memory - self.sleeping, f"waking {self.name}")
        await asyncio.sleep(self.wake_delay)
        if self.fail_wakes:
            self.fail_wakes -= 1
            self.gpu.take(self.sleeping - self.memory, f"failed wake of {self.name}")
            raise WakeFailed(f"{self.name} failed to wake (injected)")
        self.resident = True
        self.wakes += 1

    async def sleep(self) -> None:
        if self.serving:
            self.gpu.violations.append(f"{self.name} put to sleep with {self.serving} requests running")
        if not self.resident:
            raise SleepFailed(f"{self.name} is not awake")
        self.resident = False
        await asyncio.sleep(self.wake_delay / 2)
        self.gpu.take(self.sleeping - self.memory, f"sleeping {self.name}")
        self.sleeps += 1

    async def serve(self, hold: float) -> None:
        """What a request does once dispatched: it must find the backend awake throughout."""
        if not self.resident:
            self.gpu.violations.append(f"a request reached {self.name} while it was asleep")
        self.serving += 1
        try:
            await asyncio.sleep(hold)
        finally:
            self.serving -= 1


def sim_unit(driver: SimDriver, **lifecycle: object) -> Unit:
    config = LifecycleConfig.model_validate({"driver": "vllm-sleep", "memory": driver.memory,
                                             "sleeping_memory": driver.sleeping, **lifecycle})
    return Unit(key=driver.name, backend=driver.name, config=config, driver=driver, memory=driver.memory,
                sleeping_memory=driver.sleeping)
