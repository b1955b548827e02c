"""Operator actions: wake or sleep a unit now, answering the gateway's own errors, never a bare 500."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ..errors import BackendUnavailable, BadGateway, Conflict
from .actions import Actions
from .admission import Admission
from .coordination import CoordinationError, Coordinator
from .drivers.base import LifecycleError
from .intake import Intake
from .ledger import Ledger
from .units import Residency, Unit

log = logging.getLogger("synapse.scheduler")


class Admin:
    """What `Scheduler.wake` and `Scheduler.sleep` do: the backend's own answer decides, under the lease."""

    def __init__(self, ledger: Ledger, actions: Actions, intake: Intake, admission: Admission,
                 coordinator: Coordinator) -> None:
        self.ledger = ledger
        self.actions = actions
        self.intake = intake
        self.admission = admission
        self.coordinator = coordinator

    async def wake(self, unit: Unit) -> None:
        """Make `unit` resident now (no request is counted); the backend's own answer decides."""
        with _admin_errors(unit, "wake"):
            await self._verify(unit)
        await self.admission.acquire(unit)
        self.admission.release(unit)

    async def sleep(self, unit: Unit) -> None:
        """Put `unit` to sleep now, if nothing is in flight on it (409 otherwise)."""
        if not unit.evictable:
            raise Conflict(f"{unit.key} is always on; it is never put to sleep")
        with _admin_errors(unit, "sleep"):
            async with self.coordinator.lease(unit.device) as lease:
                await self.actions.sync(unit.device)
                if await self.actions.ask(unit) is False:
                    self.ledger.set(unit, Residency.ASLEEP)
                    await self.actions.publish(unit, lease)
                    return
                if unit.in_flight or unit.waited_for() or await self.coordinator.in_flight_elsewhere(unit.key):
                    raise Conflict(f"{unit.key} has requests in flight; it sleeps once they are done")
                if unit.state is not Residency.RESIDENT:
                    self.ledger.set(unit, Residency.UNKNOWN)  # our books said asleep; its backend says otherwise
                if not await self.intake.evict(unit, lease, reason="asked to"):
                    raise Conflict(f"{unit.key} is in use on another replica")

    async def _verify(self, unit: Unit) -> None:
        """Under the lease: adopt the shared table, then correct it with what the backend itself says."""
        async with self.coordinator.lease(unit.device) as lease:
            await self.actions.sync(unit.device)
            resident = await self.actions.ask(unit)
            if resident is False and unit.state is not Residency.ASLEEP:
                self.ledger.set(unit, Residency.ASLEEP)
            elif resident is True and unit.state is Residency.ASLEEP:
                self.ledger.set(unit, Residency.UNKNOWN)  # holding memory; a wake verifies it serves
            else:
                return
            await self.actions.publish(unit, lease)


@contextlib.contextmanager
def _admin_errors(unit: Unit, action: str) -> Iterator[None]:
    """An operator's action answers one of the gateway's errors, never a bare 500."""
    try:
        yield
    except LifecycleError as exc:
        log.error("%s of %s failed: %s", action, unit.key, exc)
        raise BadGateway(f"the {action} of {unit.key} failed (the gateway log says why)") from exc
    except CoordinationError as exc:
        log.error("%s of %s failed: %s", action, unit.key, exc)
        raise BackendUnavailable(f"replicas could not agree on device {unit.device}; retry", retry_after=5) from exc
