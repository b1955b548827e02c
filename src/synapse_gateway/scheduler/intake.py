"""Bringing a unit in for its waiters: make room by evicting idle units, wake it, and hand it over."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..config.schema import GpuConfig
from . import placement
from .actions import Actions
from .coordination import Coordinator, Lease, LeaseLost
from .drivers.base import LifecycleError
from .failures import NoRoom, log_failure, refusal
from .in_flight import InFlightReports
from .ledger import Ledger
from .pace import Pace
from .units import Residency, Unit, now

log = logging.getLogger("synapse.scheduler")


class Intake:
    """One bringing-in task per unit with waiters; it holds the device's lease only while acting."""

    def __init__(self, settings: GpuConfig, ledger: Ledger, actions: Actions, reports: InFlightReports,
                 coordinator: Coordinator, pace: Pace, *, shared: bool) -> None:
        self.settings = settings
        self.ledger = ledger
        self.actions = actions
        self.reports = reports
        self.coordinator = coordinator
        self.pace = pace
        self.shared = shared

    def start(self, unit: Unit) -> None:
        """Start bringing `unit` in, unless that is already under way."""
        if unit.bringing_in is None or unit.bringing_in.done():
            unit.bringing_in = asyncio.create_task(self._bring_in(unit), name=f"wake-{unit.key}")

    async def _bring_in(self, unit: Unit) -> None:
        """Make room and wake `unit` for its waiters, until none remains or max_wait has passed.

        The lease is held only while acting: between tries it is free, so sweeps, operator actions
        and other replicas go on. Whatever ends this task, no waiter is left behind.
        """
        started = now()
        failure: BaseException | None = None
        drained: set[Unit] = set()
        try:
            while unit.waited_for():
                changed = self.ledger.changed[unit.device]
                changed.clear()
                try:
                    if await self._try_bring_in(unit, drained, drain=now() - started > self.settings.starvation_cap):
                        return
                except LeaseLost as exc:  # another replica may have acted: take the lease again, look afresh
                    log.warning("lost the lease on device %s while bringing in %s: %s", unit.device, unit.key, exc)
                if now() - started >= self.settings.max_wait:
                    raise NoRoom(f"no room for {unit.key} on device {unit.device} within "
                                 f"{self.settings.max_wait:g}s: the units there stayed busy")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.pace.poll_interval):
                        await changed.wait()
        except Exception as exc:
            failure = exc
            log_failure(f"bringing in {unit.key}", exc)
        finally:
            if unit.state is Residency.RESIDENT and not unit.draining:
                self.dispatch(unit)  # also anyone who came while this task was finishing
            else:
                self._fail_waiters(unit, failure)
            self._undrain(drained)

    async def _try_bring_in(self, unit: Unit, drained: set[Unit], *, drain: bool) -> bool:
        """One try under the lease; False when it must wait for room (or for its own drain to end)."""
        async with self.coordinator.lease(unit.device) as lease:
            await self.actions.sync(unit.device)
            if unit.state is Residency.RESIDENT:
                if unit.draining:
                    return False
            else:
                if not await self.make_room(unit.device, unit, lease, drain=drain, drained=drained):
                    return False
                await self.actions.wake(unit, lease)
            # Hand it over and announce the count before the lease goes, or another replica
            # could take the lease and evict the unit under the requests just dispatched.
            self.dispatch(unit)
            if self.shared:
                await self.reports.write(unit)
                unit.confirmed = unit.in_flight > 0
            return True

    def dispatch(self, unit: Unit) -> None:
        """Hand the unit to everyone waiting: counted in flight before they run, so it can't be evicted."""
        before = unit.in_flight
        while unit.waiters:
            future = unit.waiters.popleft()
            if not future.done():
                unit.in_flight += 1
                future.set_result(None)
        unit.touch()
        if before == 0 and unit.in_flight:
            self.reports.report(unit)

    def _fail_waiters(self, unit: Unit, cause: BaseException | None) -> None:
        """Answer every waiter 503; what went wrong inside is in the log, not in the client's answer."""
        while unit.waiters:
            future = unit.waiters.popleft()
            if not future.done():
                future.set_exception(refusal(unit, cause))

    def _undrain(self, drained: set[Unit]) -> None:
        for other in drained:
            if other.draining and other.state is Residency.RESIDENT:
                other.draining = False
                self.dispatch(other)

    async def make_room(self, device: str, unit: Unit | None, lease: Lease, *, drain: bool,
                        drained: set[Unit] | None = None) -> bool:
        """Evict idle units (lowest priority, least recently used first) until `unit` fits.

        False when the rest are busy or not settled: the caller waits and tries again. With `drain`,
        the busy units in the way stop admitting, so they empty and can go (against starvation).
        """
        while True:
            others = [u for u in self.ledger.on(device) if u is not unit]
            capacity = self.ledger.capacity(device)
            if unit is not None and (reason := placement.impossible(others, capacity, unit)):
                raise NoRoom(reason)
            conflicts = placement.conflicts(others, unit)
            over = placement.overflow(others, capacity, unit)
            if not conflicts and over <= 0:
                return True
            wanted = conflicts or placement.candidates(others)
            if await self._evict_one(placement.eligible(wanted, now()), lease, unit):
                continue
            if drain and drained is not None:
                busy = wanted if conflicts else placement.to_drain(wanted, over)
                for other in busy:
                    if other.state is Residency.RESIDENT and not other.draining:
                        other.draining = True  # stop admitting to it, so it drains and can be evicted
                        drained.add(other)
            return False

    async def _evict_one(self, victims: list[Unit], lease: Lease, unit: Unit | None) -> bool:
        """Evict the first victim that will go; one whose sleep fails stays counted in full."""
        for victim in victims:
            if await self.coordinator.in_flight_elsewhere(victim.key):
                continue
            try:
                if await self.evict(victim, lease, reason=f"room for {unit.key}" if unit else "over budget"):
                    return True
            except LifecycleError as exc:
                log.error("%s", exc)
        return False

    async def evict(self, victim: Unit, lease: Lease, *, reason: str) -> bool:
        """`Actions.evict`, then bring the victim back at once if requests came for it while it went to sleep."""
        if not await self.actions.evict(victim, lease, reason=reason):
            return False
        if victim.waiters:
            self.start(victim)
        return True
