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
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Seed the limiter with the stored spend of each budgeted key's current period."""
        now = time.time()
        periods = {key.id: key.limits(now) for key in self.keyring.keys.values()
                   if key.settings.max_budget is not None or key.settings.token_budget is not None}
        if periods:
            try:
                store = KeyStore(await self.state())
                stored = await asyncio.wait_for(store.load_spend([(k, p.period) for k, p in periods.items()]), 5.0)
            except (StorageError, TimeoutError) as exc:
                log.warning("cannot read budget spend from the database (%s); budgets count from zero until "
                            "it answers", str(exc) or "no answer in 5s")
                stored = {}
            for (key_id, period), (tokens, cost) in stored.items():
                await self.limiter.seed(key_id, period, Usage(tokens, cost), period_end=periods[key_id].period_end)
                self._saved[(key_id, period)] = Usage(tokens, cost)
        self._task = asyncio.create_task(self._run(), name="spend-checkpoint")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.save()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save()

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
