"""The driver-action edge: every wake, sleep and residency question, bounded, and published to the other replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from . import placement
from .coordination import CoordinationError, Coordinator, Lease, LeaseLost
from .drivers.base import LifecycleError, SleepFailed, WakeFailed
from .failures import NoRoom, log_failure
from .ledger import Ledger
from .metrics import SchedulerMetrics
from .pace import Pace
from .units import Residency, Unit, now

log = logging.getLogger("synapse.scheduler")


class Actions:
    """Wake, evict, probe and settle units through their drivers, keeping the shared table in step."""

    def __init__(self, ledger: Ledger, coordinator: Coordinator, metrics: SchedulerMetrics, pace: Pace, *,
                 real_memory: Callable[[Unit], Awaitable[None]]) -> None:
        self.ledger = ledger
        self.coordinator = coordinator
        self.metrics = metrics
        self.pace = pace
        # Waits until the device really has the memory a wake needs (NVML), or raises NoRoom.
        self.real_memory = real_memory

    async def probe(self, unit: Unit) -> None:
        """At start-up: take the backend's word for the unit's residency, in doubt when it cannot say."""
        resident = await self.ask(unit)
        if resident is None:
            log.warning("cannot tell whether %s is resident; counting its memory until it is known", unit.key)
        state = {True: Residency.RESIDENT, False: Residency.ASLEEP, None: Residency.UNKNOWN}[resident]
        unit.resident_since = now()
        unit.touch()
        self.ledger.set(unit, state)

    async def sync(self, device: str) -> None:
        """Adopt the states other replicas published: under the lease, the shared table is the truth.

        A record left waking or sleeping means its writer stopped mid-action: in doubt, counted in full.
        """
        table = await self.coordinator.snapshot()
        for unit in self.ledger.on(device):
            record = table.get(unit.key)
            if record is None:
                continue
            state = placement.adopted(record.get("state"))
            if state is not unit.state:
                if state is Residency.RESIDENT:
                    unit.resident_since = now()
                self.ledger.set(unit, state)

    async def wake(self, unit: Unit, lease: Lease) -> None:
        lease.check()
        capacity = self.ledger.capacity(unit.device)
        if unit.memory > capacity:
            raise NoRoom(f"{unit.key} needs {unit.memory} bytes; device {unit.device} has {capacity}")
        await self.real_memory(unit)
        before = unit.state
        self.ledger.set(unit, Residency.WAKING)
        try:
            await self.publish(unit, lease)
        except BaseException:
            self.ledger.set(unit, before)  # nothing was asked of the backend yet
            raise
        started = now()
        try:
            await self.act(unit, unit.driver.wake, lease, "wake")
        except LeaseLost:
            self.ledger.set(unit, Residency.UNKNOWN)  # the next holder finds "waking" and verifies it
            raise
        except LifecycleError as exc:
            await self.settle(unit, lease)
            raise WakeFailed(f"waking {unit.key} failed: {exc}") from exc
        unit.resident_since = now()
        self.ledger.set(unit, Residency.RESIDENT)
        try:
            await self.publish(unit, lease)
        except CoordinationError:
            self.ledger.set(unit, Residency.UNKNOWN)  # awake, but the others don't know: wake (a no-op) again
            raise
        self.metrics.swap(unit, "wake", now() - started)
        log.info("%s is resident (woke in %.2fs; device %s uses %d of %d bytes)", unit.key, now() - started,
                 unit.device, self.ledger.used(unit.device), self.ledger.capacity(unit.device))

    async def evict(self, victim: Unit, lease: Lease, *, reason: str) -> bool:
        """Put `victim` to sleep; False when another replica turned out to be using it (it stays)."""
        lease.check()
        before = victim.state
        if victim.in_flight or before not in (Residency.RESIDENT, Residency.UNKNOWN):
            return False  # a request got in while we looked
        self.ledger.set(victim, Residency.SLEEPING)  # new requests here queue from now on
        victim.confirmed = False
        try:
            await self.publish(victim, lease)
            busy = await self.coordinator.in_flight_elsewhere(victim.key)
        except BaseException:
            self.ledger.set(victim, before)
            raise
        if busy:
            self.ledger.set(victim, before)
            await self.publish(victim, lease)
            return False
        started = now()
        try:
            await self.act(victim, victim.driver.sleep, lease, "sleep")
        except LeaseLost:
            self.ledger.set(victim, Residency.UNKNOWN)
            raise
        except LifecycleError as exc:
            await self.settle(victim, lease)
            if victim.state is not Residency.ASLEEP:
                raise SleepFailed(f"putting {victim.key} to sleep failed: {exc}") from exc
            log.warning("putting %s to sleep reported an error, but it is asleep: %s", victim.key, exc)
        victim.draining = False
        self.ledger.set(victim, Residency.ASLEEP)
        await self.publish(victim, lease)
        self.metrics.swap(victim, "sleep", now() - started)
        log.info("%s is asleep (%s, in %.2fs)", victim.key, reason, now() - started)
        return True

    async def act(self, unit: Unit, action: Callable[[], Awaitable[None]], lease: Lease, what: str) -> None:
        """One driver call, bounded by wake_timeout and abandoned if the lease is lost meanwhile.

        Every failure becomes a LifecycleError (LeaseLost aside): the edge where a driver's foreign
        errors stop, whatever it lets through.
        """
        call = asyncio.ensure_future(action())
        lost = asyncio.create_task(lease.lost.wait())
        try:
            async with asyncio.timeout(unit.config.wake_timeout):
                await asyncio.wait({call, lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise LifecycleError(f"{what} of {unit.key} timed out after {unit.config.wake_timeout:g}s") from None
        finally:
            for task in (call, lost):
                task.cancel()
            await asyncio.gather(call, lost, return_exceptions=True)
        if not call.done() or call.cancelled():
            raise LeaseLost(f"lease on device {unit.device} lost during the {what} of {unit.key}")
        if (exc := call.exception()) is not None:
            if not isinstance(exc, LifecycleError):
                log.error("the %s driver of %s raised %s", what, unit.key, type(exc).__name__, exc_info=exc)
                raise LifecycleError(f"{what} of {unit.key} failed: {type(exc).__name__}: {exc}") from exc
            raise exc

    async def ask(self, unit: Unit) -> bool | None:
        """The backend's own answer (bounded): resident or not, or None when it cannot say."""
        try:
            async with asyncio.timeout(self.pace.probe_timeout):
                return bool(await unit.driver.is_resident())
        except Exception as exc:
            log_failure(f"asking whether {unit.key} is resident", exc, level=logging.WARNING)
            return None

    async def settle(self, unit: Unit, lease: Lease) -> None:
        """After a failed action: asleep only if the backend says so; otherwise in doubt, counted in full."""
        resident = await self.ask(unit)
        self.ledger.set(unit, Residency.ASLEEP if resident is False else Residency.UNKNOWN)
        with contextlib.suppress(CoordinationError):  # unpublished, the others still see it waking or sleeping
            await self.publish(unit, lease)

    async def publish(self, unit: Unit, lease: Lease) -> None:
        await self.coordinator.publish(unit.key, {"state": str(unit.state), "memory": unit.held(),
                                                  "since": now()}, lease.token)
