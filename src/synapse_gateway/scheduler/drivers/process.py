"""A backend whose engine Synapse starts and stops itself: asleep means the process is not running."""

from __future__ import annotations

from ...engines.process import EngineFailed, ManagedEngine
from .base import WakeFailed


class ProcessDriver:
    """Wake starts the managed engine and waits for its health check; sleep stops it (like llama-swap)."""

    def __init__(self, engine: ManagedEngine) -> None:
        self.engine = engine

    async def is_resident(self) -> bool:
        return self.engine.ready.is_set()

    async def wake(self) -> None:
        await self.engine.start()
        try:
            await self.engine.wait_ready(self.engine.config.startup_timeout)
        except EngineFailed as exc:
            await self.engine.stop()
            raise WakeFailed(str(exc)) from exc

    async def sleep(self) -> None:
        await self.engine.stop()
