"""A backend whose engine Synapse starts and stops itself: asleep means the process is not running."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Self

from ...config.schema import ProcessLifecycle
from ...engines.process import ManagedEngine
from .base import DriverContext, SleepFailed, WakeFailed, lifecycle_errors


class ProcessDriver:
    """Wake starts the managed engine and waits for its health check; sleep stops it (like llama-swap).

    The engine is this replica's own child process, so the driver is only true for the whole
    deployment with one gateway replica; `synapse check` refuses it together with `gpu.redis_url`.
    """

    def __init__(self, engine: ManagedEngine) -> None:
        self.engine = engine

    @classmethod
    def from_config(cls, config: ProcessLifecycle, context: DriverContext) -> Self:
        """The backend's `managed` engine; the config check makes sure there is one."""
        if context.backend.engine is None:
            raise ValueError(f"backend {context.backend.name}: the process driver needs a `managed:` command")
        return cls(context.backend.engine)

    async def is_resident(self) -> bool:
        return self.engine.ready.is_set()

    async def wake(self) -> None:
        with lifecycle_errors(f"starting engine {self.engine.name}", WakeFailed):
            try:
                await self.engine.start()
                await self.engine.wait_ready(self.engine.config.startup_timeout)
            except BaseException:
                await self.engine.stop()  # never leave a half-started engine holding memory (F14)
                raise

    async def sleep(self) -> None:
        with lifecycle_errors(f"stopping engine {self.engine.name}", SleepFailed):
            await self.engine.stop()


def restarter(engine: ManagedEngine) -> Callable[[], Awaitable[None]]:
    """Stop and start `engine` and wait until it is healthy: the fallback of a wake that failed."""

    async def restart() -> None:
        with lifecycle_errors(f"restarting engine {engine.name}", WakeFailed):
            await engine.stop()
            await engine.start()
            await engine.wait_ready(engine.config.startup_timeout)

    return restart
