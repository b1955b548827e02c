"""A model that loads on first use (in a thread, once, whoever asks) and unloads after idling."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

from ..errors import GatewayError

T = TypeVar("T")
log = logging.getLogger("synapse.audio")


class ModelLoadFailed(GatewayError):
    """A configured model could not be loaded; the cause is in the engine log."""

    status, error_type, code = 500, "api_error", "model_load_failed"


class Resident(Generic[T]):
    """Holds one model: `use()` loads it when absent; `unload_if_idle` drops it when unused long enough."""

    def __init__(self, kind: str, name: str, loader: Callable[[], T]) -> None:
        self.kind = kind
        self.name = name
        self._loader = loader
        self._model: T | None = None
        self._loading: asyncio.Task[T] | None = None
        self.in_use = 0
        self.last_used = time.monotonic()
        self.loads = 0
        self.load_seconds: float | None = None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory now."""
        return self._model is not None

    @asynccontextmanager
    async def use(self) -> AsyncIterator[T]:
        """The loaded model, kept loaded until the block ends."""
        self.in_use += 1
        try:
            yield await self._ensure()
        finally:
            self.in_use -= 1
            self.last_used = time.monotonic()

    async def _ensure(self) -> T:
        if self._model is not None:
            return self._model
        if self._loading is None:
            self._loading = asyncio.create_task(self._load(), name=f"load {self.kind} {self.name}")
        # shield: a request that goes away must not abandon a load that others wait for
        return await asyncio.shield(self._loading)

    async def _load(self) -> T:
        started = time.perf_counter()
        log.info("loading %s model %s", self.kind, self.name)
        try:
            model = await asyncio.to_thread(self._loader)
        except Exception as exc:
            log.exception("could not load %s model %s", self.kind, self.name)
            raise ModelLoadFailed(f"the {self.kind} model `{self.name}` could not be loaded; "
                                  "the audio engine's log has the cause") from exc
        finally:
            self._loading = None
        self.load_seconds = time.perf_counter() - started
        self.loads += 1
        self._model = model
        log.info("loaded %s model %s in %.2fs", self.kind, self.name, self.load_seconds,
                 extra={"fields": {"model": self.name, "load_s": round(self.load_seconds, 3)}})
        return model

    def unload_if_idle(self, idle_after: float, now: float | None = None) -> bool:
        """Drop the model when nobody uses it and it has been idle `idle_after` seconds; True if dropped."""
        now = time.monotonic() if now is None else now
        if self._model is None or self.in_use or now - self.last_used < idle_after:
            return False
        self._model = None
        log.info("unloaded %s model %s after %.0fs idle", self.kind, self.name, now - self.last_used)
        return True

    def status(self) -> dict[str, Any]:
        """What /health says about this model."""
        idle = None if self.in_use else round(time.monotonic() - self.last_used, 3)
        return {"loaded": self.loaded, "in_use": self.in_use, "idle_s": idle, "loads": self.loads,
                "load_s": None if self.load_seconds is None else round(self.load_seconds, 3)}
