"""A schedulable unit (a backend, or one model of an Ollama) and its residency bookkeeping."""

from __future__ import annotations

import asyncio
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
    # A wake or sleep failed, timed out or was abandoned: the unit may hold its full memory, so it is
    # counted in full and admits nothing until its driver says which it is.
    UNKNOWN = "unknown"


def now() -> float:
    """The scheduler's clock: the running loop's, so a simulation with virtual time drives it."""
    return asyncio.get_running_loop().time()


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
        """Memory counted against the budget: anything but a confirmed sleep counts in full."""
        return self.sleeping_memory if self.state is Residency.ASLEEP else self.memory

    def idle_for(self, at: float) -> float:
        return at - self.last_used

    def settled_in(self, at: float) -> bool:
        """Resident for at least its minimum residency (against thrash)."""
        return at - self.resident_since >= self.config.min_residency

    def waited_for(self) -> bool:
        """Whether any request still waits for this unit (a wait that timed out or was cancelled doesn't)."""
        return any(not future.done() for future in self.waiters)

    def touch(self) -> None:
        self.last_used = now()
