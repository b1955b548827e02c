"""Budget spend survives restarts: settled spend is copied to the database every few seconds, off the
request path, and read back into the limiter at start-up.

The limiter (memory or Redis) stays the authority while the gateway runs; the database copy only
seeds it, raising spend and never lowering it, so a restart (or a Redis without persistence) cannot
refill a budget. It is written from the limiter's own numbers, never from the usage ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..state import StateDatabase
from ..storage.database import StorageError
from ..storage.keystore import KeyStore
from .keyring import Keyring
from .limits import Limiter, Usage

log = logging.getLogger("synapse.limits")


class SpendCheckpoint:
    """Copies settled spend to `budget_spend` every `interval` seconds and seeds the limiter at start."""

    def __init__(self, limiter: Limiter, keyring: Keyring, state: StateDatabase, *, interval: float = 5.0) -> None:
        self.limiter = limiter
        self.keyring = keyring
        self.state = state
        self.interval = interval
        self._saved: dict[tuple[str, str], Usage] = {}
        self._seeded: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Seed the limiter with the stored spend of each budgeted key's current period, then keep
        checkpointing (and seeding keys that appear later, or all of them once a database that was
        down answers)."""
        if not await self.seed():
            log.warning("cannot read budget spend from the database; budgets count from zero until it answers")
        self._task = asyncio.create_task(self._run(), name="spend-checkpoint")

    async def seed(self) -> bool:
        """Seed every budgeted (key, period) not seeded yet; False when the database did not answer."""
        now = time.time()
        periods = {key.id: key.limits(now) for key in self.keyring.keys.values()
                   if key.settings.max_budget is not None or key.settings.token_budget is not None}
        wanted = [(key_id, limits.period) for key_id, limits in periods.items() if (key_id, limits.period)
                  not in self._seeded]
        if not wanted:
            return True
        try:
            stored = await asyncio.wait_for(KeyStore(await self.state()).load_spend(wanted), 5.0)
        except (StorageError, TimeoutError):
            return False
        for (key_id, period), (tokens, cost) in stored.items():
            await self.limiter.seed(key_id, period, Usage(tokens, cost), period_end=periods[key_id].period_end)
            self._saved[(key_id, period)] = Usage(tokens, cost)
        self._seeded.update(wanted)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.save()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.seed()
                await self.save()
            except Exception:  # the checkpoint must outlive any failure
                log.exception("budget checkpoint failed; will retry")

    async def save(self) -> None:
        """Write the spend that changed since the last save; a database error waits for the next one."""
        spend = self.limiter.settled_spend()
        changed = [(key_id, period, usage.tokens, usage.cost) for (key_id, period), usage in spend.items()
                   if self._saved.get((key_id, period)) != usage]
        if not changed:
            return
        try:
            await asyncio.wait_for(KeyStore(await self.state()).save_spend(changed), 5.0)
        except (StorageError, TimeoutError) as exc:
            log.warning("cannot save budget spend to the database (%s); will retry", str(exc) or "no answer in 5s")
            return
        for key_id, period, tokens, cost in changed:
            self._saved[(key_id, period)] = Usage(tokens, cost)
