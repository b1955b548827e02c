"""Admission: count a request in flight on a resident unit (confirmed once across replicas), or queue it."""

from __future__ import annotations

import asyncio

from ..config.schema import GpuConfig
from ..errors import BackendUnavailable
from .coordination import CoordinationError, Coordinator
from .failures import QueueFull
from .in_flight import InFlightReports
from .intake import Intake
from .ledger import Ledger
from .metrics import SchedulerMetrics
from .units import Residency, Unit, now


class Admission:
    """`acquire` and `release` for the `Scheduler`; a request that must wait is queued for the `Intake`."""

    def __init__(self, settings: GpuConfig, ledger: Ledger, intake: Intake, reports: InFlightReports,
                 coordinator: Coordinator, metrics: SchedulerMetrics, *, shared: bool) -> None:
        self.settings = settings
        self.ledger = ledger
        self.intake = intake
        self.reports = reports
        self.coordinator = coordinator
        self.metrics = metrics
        self.shared = shared
        self.closed = False

    def close(self) -> None:
        """From now on, a request that would have to wait is answered 503 at once."""
        self.closed = True

    async def acquire(self, unit: Unit) -> None:
        """Return when `unit` is resident with this request counted in flight; 503 when it cannot be."""
        if unit.state is Residency.RESIDENT and not unit.draining and await self._admit(unit):
            return
        if self.closed:
            raise BackendUnavailable(f"{unit.key} cannot be woken: the gateway is shutting down", retry_after=5)
        if len(unit.waiters) >= self.settings.max_queue:
            raise QueueFull(f"{len(unit.waiters)} requests are already waiting for {unit.key}", retry_after=5)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        unit.waiters.append(future)
        self.metrics.queue(unit)
        self.intake.start(unit)
        started = now()
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
            self.metrics.queue(unit, waited=now() - started)

    async def _admit(self, unit: Unit) -> bool:
        """The fast path: count the request in flight on a resident unit (checked once across replicas)."""
        unit.in_flight += 1
        unit.touch()
        if not self.shared:
            if unit.in_flight == 1:
                self.reports.report(unit)
            return True
        if unit.confirmed:
            return True
        if unit.confirming is None or unit.confirming.done():
            unit.confirming = asyncio.create_task(self._still_resident_everywhere(unit))
        try:
            confirmed = await asyncio.shield(unit.confirming)
        except CoordinationError as exc:
            self.release(unit)
            raise BackendUnavailable(f"replicas cannot agree on {unit.key} right now ({type(exc).__name__})",
                                     retry_after=5) from exc
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
        await self.reports.write(unit)
        record = (await self.coordinator.snapshot()).get(unit.key)
        if record is None or record.get("state") == str(Residency.RESIDENT):
            unit.confirmed = unit.in_flight > 0
            return True
        self.ledger.set(unit, Residency.UNKNOWN)  # another replica changed it; the slow path syncs under the lease
        return False

    def release(self, unit: Unit) -> None:
        unit.in_flight -= 1
        unit.touch()
        if unit.in_flight == 0:
            unit.confirmed = False  # idle here: another replica may now evict it
            self.ledger.changed[unit.device].set()
            self.reports.report(unit)
