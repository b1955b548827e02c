"""A simulated GPU, drivers and clock for scheduler tests: they check the invariants as they run.

The drivers implement only our own LifecycleDriver interface, with delays and injected failures of
every kind a real driver has let through (disconnects, bad JSON, timeouts, hangs, bugs); the real
drivers are tested against faithful fakes of vLLM, Ollama and Kubernetes elsewhere. The memory a
driver really holds lives in its SimGpu, never in the scheduler's books, so the two can be compared.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from pydantic import TypeAdapter

from synapse_gateway.config.schema import LifecycleConfig
from synapse_gateway.scheduler.drivers.base import SleepFailed, WakeFailed
from synapse_gateway.scheduler.units import Unit

T = TypeVar("T")
HANG = 3600.0  # longer than any timeout a test sets: a call that never answers


def _bad_json() -> Exception:
    try:
        orjson.loads(b"{not json")
    except orjson.JSONDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


# Raised at once, before the backend changed anything.
RAISED: dict[str, Callable[[str], Exception]] = {
    "lifecycle": lambda who: WakeFailed(f"{who} refused (injected)"),
    "disconnect": lambda who: aiohttp.ServerDisconnectedError(),
    "payload": lambda who: aiohttp.ClientPayloadError("Response payload is not completed"),
    "bad-json": lambda who: _bad_json(),
    "attribute": lambda who: AttributeError("'list' object has no attribute 'get'"),
    "timeout": lambda who: TimeoutError(),
    "os": lambda who: ConnectionResetError(104, "Connection reset by peer"),
    "runtime": lambda who: RuntimeError(f"a bug in {who}'s driver (injected)"),
}
# Wake: "hang" takes the memory and never answers; "half" takes it and fails (a half-woken engine).
# Sleep: "hang" stops serving and never answers; "after" sleeps, then the answer is lost.
WAKE_FAULTS = [*RAISED, "hang", "half"]
SLEEP_FAULTS = [*RAISED, "hang", "after"]
PROBE_FAULTS = [*RAISED, "hang"]


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
    """A backend that holds `memory` while awake (and `sleeping` while asleep) and fails on command.

    `holding` is what its residency question answers (the authority); `awake` is whether it can serve:
    a half-woken backend holds its memory but cannot serve.
    """

    name: str
    gpu: SimGpu
    memory: int
    sleeping: int = 0
    wake_delay: float = 0.002
    probe_delay: float = 0.0
    always_on: bool = False
    holding: bool = False
    awake: bool = False
    serving: int = 0
    wake_faults: list[str] = field(default_factory=list)
    sleep_faults: list[str] = field(default_factory=list)
    probe_faults: list[str] = field(default_factory=list)
    wakes: int = 0
    sleeps: int = 0
    served: int = 0

    def __post_init__(self) -> None:
        self.holding = self.awake = self.holding or self.always_on
        self.gpu.take(self.memory if self.holding else self.sleeping, f"{self.name} at start")

    async def is_resident(self) -> bool:
        await self._fault(self.probe_faults)
        await asyncio.sleep(self.probe_delay)
        return self.holding

    async def wake(self) -> None:
        fault = await self._fault(self.wake_faults)
        if not self.holding:
            self.holding = True
            self.gpu.take(self.memory - self.sleeping, f"waking {self.name}")
        await asyncio.sleep(self.wake_delay)
        if fault == "hang":
            await asyncio.sleep(HANG)
        if fault == "half":
            raise WakeFailed(f"{self.name} woke only half (injected)")
        self.awake = True
        self.wakes += 1

    async def sleep(self) -> None:
        if self.serving:
            self.gpu.violations.append(f"{self.name} put to sleep with {self.serving} requests running")
        if self.always_on:
            self.gpu.violations.append(f"always-on {self.name} was put to sleep")
        fault = await self._fault(self.sleep_faults)
        self.awake = False
        if fault == "hang":
            await asyncio.sleep(HANG)
        await asyncio.sleep(self.wake_delay / 2)
        if self.holding:
            self.holding = False
            self.gpu.take(self.sleeping - self.memory, f"sleeping {self.name}")
            self.sleeps += 1
        if fault == "after":
            raise aiohttp.ServerDisconnectedError()

    async def serve(self, hold: float) -> None:
        """What a request does once dispatched: it must find the backend awake throughout."""
        if not self.awake:
            self.gpu.violations.append(f"a request reached {self.name} while it could not serve")
        self.serving += 1
        try:
            await asyncio.sleep(hold)
        finally:
            self.serving -= 1
        if not self.awake:
            self.gpu.violations.append(f"{self.name} stopped serving under a request")
        self.served += 1

    async def _fault(self, faults: list[str]) -> str | None:
        """Consume the next injected fault: raise it, or hand back one the caller plays out."""
        if not faults:
            return None
        fault = faults.pop(0)
        if fault == "lifecycle":
            raise (SleepFailed if faults is self.sleep_faults else WakeFailed)(f"{self.name} refused (injected)")
        if fault in RAISED:
            raise RAISED[fault](self.name)
        if fault == "hang" and faults is self.probe_faults:
            await asyncio.sleep(HANG)
        return fault


_LIFECYCLE: TypeAdapter[LifecycleConfig] = TypeAdapter(LifecycleConfig)


def sim_unit(driver: SimDriver, **lifecycle: object) -> Unit:
    config = _LIFECYCLE.validate_python({"driver": "always-on" if driver.always_on else "vllm-sleep",
                                         "memory": driver.memory, "sleeping_memory": driver.sleeping, **lifecycle})
    return Unit(key=driver.name, backend=driver.name, config=config, driver=driver, memory=driver.memory,
                sleeping_memory=driver.sleeping)


class _JumpingSelector(selectors.SelectSelector):
    """Never sleeps: when nothing is ready, time jumps to the next timer instead."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout is None:
            return ready or super().select(0.01)  # nothing timed: only I/O or another thread can help
        self.clock += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock advances only when every task waits: hours pass in milliseconds.

    Runs are deterministic (no wall-clock jitter on a loaded CI machine), and timeouts, idle sweeps
    and min_residency can be exercised at their real sizes.
    """

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.clock


def run_virtual(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `main()` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
