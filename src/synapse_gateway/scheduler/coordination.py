"""Cross-replica coordination: per-device leases with fencing tokens, a shared residency table, in-flight counts."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("synapse.coordination")


class CoordinationError(Exception):
    """Coordination between replicas failed; lifecycle actions must not proceed."""


class CoordinatorUnavailable(CoordinationError):
    """Redis did not answer, so replicas cannot share the GPU safely until it does."""


class LeaseTimeout(CoordinationError):
    """Another replica held the device lease for longer than this one was willing to wait."""


class LeaseLost(CoordinationError):
    """The lease may now belong to another replica; stop before touching the device."""


class StaleToken(LeaseLost):
    """A write carried a fencing token older than the device's newest, so it was refused."""

    def __init__(self, unit: str, token: int) -> None:
        super().__init__(f"publish of {unit!r} refused: fencing token {token} is stale (the device lease moved on)")


@dataclass
class Lease:
    """One held device lease: `token` fences writes, `lost` fires once ownership can't be trusted."""

    device: str
    token: int
    expires_at: float = math.inf  # time.monotonic() after which ownership is unproven even if renewal hangs
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        """Raise before the caller acts on a device it may no longer own."""
        if self.lost.is_set() or time.monotonic() >= self.expires_at:
            raise LeaseLost(f"lease on device {self.device!r} (token {self.token}) was lost; abandon this action")


class Coordinator(Protocol):
    """What the scheduler needs from its peers: exclusive device actions and one shared view of residency."""

    def lease(self, device: str) -> AbstractAsyncContextManager[Lease]: ...
    async def publish(self, unit: str, state: dict[str, Any], token: int) -> None: ...
    async def snapshot(self) -> dict[str, dict[str, Any]]: ...
    async def report_in_flight(self, unit: str, count: int) -> None: ...
    async def in_flight_elsewhere(self, unit: str) -> int: ...
    async def connect(self) -> None: ...
    async def close(self) -> None: ...


class LocalCoordinator:
    """A single replica's coordinator: everything in memory, no peers to wait for."""

    def __init__(self) -> None:
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._counter = 0
        self._newest: dict[str, int] = {}
        self._table: dict[str, dict[str, Any]] = {}

    @asynccontextmanager
    async def lease(self, device: str) -> AsyncIterator[Lease]:
        """Serialize lifecycle actions per device among this process's tasks."""
        async with self._locks[device]:
            self._counter += 1
            self._newest[device] = self._counter
            yield Lease(device, self._counter)

    async def publish(self, unit: str, state: dict[str, Any], token: int) -> None:
        """Record a unit's residency, refusing holders of superseded leases as Redis does."""
        if token not in self._newest.values():
            raise StaleToken(unit, token)
        self._table[unit] = dict(state)

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        """Copy the table so callers can't mutate shared state by accident."""
        return {unit: dict(state) for unit, state in self._table.items()}

    async def report_in_flight(self, unit: str, count: int) -> None:
        """Nothing to share: there are no other replicas."""

    async def in_flight_elsewhere(self, unit: str) -> int:
        """No other replica exists, so nobody else can be using the unit."""
        return 0

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release."""


# Values in expiring hashes are "<expiry ms, Redis clock>|<payload>": Redis 7.0 has no per-field TTL.
