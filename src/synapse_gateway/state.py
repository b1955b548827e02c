"""The state database (keys, budget checkpoints, usage), opened once on first use and shared.

Opening is lazy and retried: a database that is down at start-up must not stop the gateway from
serving, so each user asks for it when it needs it and copes with a StorageError meanwhile.
"""

from __future__ import annotations

import asyncio

from .storage.database import Database
from .storage.migrations import open_migrated


class StateDatabase:
    """`await state()` is the migrated database, opened on the first call that succeeds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._database: Database | None = None
        self._opening = asyncio.Lock()

    async def __call__(self) -> Database:
        database = self._database
        if database is not None:
            return database
        async with self._opening:
            if self._database is None:
                self._database = await open_migrated(self.url)
            return self._database

    async def close(self) -> None:
        if self._database is not None:
            await self._database.close()
            self._database = None
