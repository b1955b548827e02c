"""A schedulable unit (a backend, or one model of an Ollama) and its residency bookkeeping."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from ..config.schema import LifecycleConfig
from .drivers.base import LifecycleDriver


class Residency(StrEnum):
    ASLEEP = "asleep"
    WAKING = "waking"
    RESIDENT = "resident"
    SLEEPING = "sleeping"


@dataclass(eq=False)
class Unit:
    """What the scheduler knows of one unit; only the scheduler changes it."""

    key: str
    backend: str
    config: LifecycleConfig
    driver: LifecycleDriver
    memory: int
    sleeping_memory: int = 0
    slot_group: str | None = None
    slot_limit: int = 0
    state: Residency = Residency.ASLEEP
    in_flight: int = 0
    last_used: float = 0.0
    resident_since: float = 0.0
    draining: bool = False
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    bringing_in: asyncio.Task[None] | None = None
    report_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # With several replicas: whether this replica's in-flight count is known to the others while the
    # unit is resident (then new requests go straight through), and the check that establishes it.
    confirmed: bool = False
    confirming: asyncio.Task[bool] | None = None

    @property
    def device(self) -> str:
        return self.config.device

    @property
    def evictable(self) -> bool:
        return self.config.driver != "always-on"

    def held(self) -> int:
        """Memory counted against the budget: while waking or going to sleep it still counts in full."""
        return self.sleeping_memory if self.state is Residency.ASLEEP else self.memory

    def idle_for(self, now: float) -> float:
        return now - self.last_used

    def settled_in(self, now: float) -> bool:
        """Resident for at least its minimum residency (against thrash)."""
        return now - self.resident_since >= self.config.min_residency

    def touch(self) -> None:
        self.last_used = time.monotonic()
