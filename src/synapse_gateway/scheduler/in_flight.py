"""Telling the other replicas how many requests are in flight on each unit here (they must not evict it)."""

from __future__ import annotations

import asyncio
import logging

from .coordination import Coordinator
from .units import Unit

log = logging.getLogger("synapse.scheduler")


class InFlightReports:
    """Reports sent in the background when a unit starts or stops being in use here, or written at once."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.pending: set[asyncio.Task[None]] = set()

    def report(self, unit: Unit) -> None:
        """Tell other replicas when a unit starts or stops being in use here (they must not evict it)."""
        task = asyncio.create_task(self.write(unit))
        self.pending.add(task)
        task.add_done_callback(self._reported)

    def _reported(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the heartbeat re-sends; say why
            log.warning("reporting in-flight requests to other replicas failed: %s", task.exception())

    async def write(self, unit: Unit) -> None:
        """Reports are serialized per unit and send the count as it is when written, never a stale one."""
        async with unit.report_lock:
            await self.coordinator.report_in_flight(unit.key, unit.in_flight)
