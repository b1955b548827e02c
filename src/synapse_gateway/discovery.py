"""Finds which models each backend serves, and whether it answers; periodically and on a routing miss."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import aiohttp
import orjson

from .backends import Backend
from .config.schema import DiscoveryConfig
from .engines.process import EngineState
from .routing import Router

log = logging.getLogger("synapse.discovery")
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_NEGATIVE_CACHE_SIZE = 4096


class Catalog:
    """Keeps the router's discovered-model table and each backend's reachability fresh."""

    def __init__(self, router: Router, session: aiohttp.ClientSession, settings: DiscoveryConfig) -> None:
        self.router = router
        self.session = session
        self.settings = settings
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._last_refresh = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probe every backend once, then keep refreshing in the background."""
        await self.refresh()
        self._loop_task = asyncio.create_task(self._loop(), name="synapse-discovery")

    async def stop(self) -> None:
        for task in (self._loop_task, self._refreshing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.refresh()
            except Exception:  # never let the loop die; the next round retries
                log.exception("model discovery failed")

    async def refresh(self) -> None:
        """Ask all backends at once; one refresh at a time, shared by concurrent callers."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_all())
        await asyncio.shield(self._refreshing)

    async def _refresh_all(self) -> None:
        self._last_refresh = time.monotonic()
        await asyncio.gather(*(self.probe(b) for b in self.router.backends.values()))

    async def refresh_on_miss(self, model: str) -> None:
        """Refresh discovered models for an unknown name, unless it missed recently or a refresh just ran."""
        now = time.monotonic()
        expires = self._misses.get(model)
        if expires is not None and expires > now:
            return
        await self._engines_settled()
        if now - self._last_refresh >= self.settings.min_refresh_gap:
            await self.refresh()
        elif self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
        if self.router.resolve(model, use_fallback=False) is None:
            self._misses[model] = now + self.settings.negative_ttl
            self._misses.move_to_end(model)
            while len(self._misses) > _NEGATIVE_CACHE_SIZE:
                self._misses.popitem(last=False)

    async def _engines_settled(self) -> None:
        """Let managed engines that are still starting report their models before a name counts as unknown."""
        starting = [b.engine for b in self.router.backends.values()
                    if b.engine is not None and b.discover and b.engine.state is EngineState.STARTING]
        if not starting:  # an engine the scheduler starts on demand, or a stopped one, is not waited for
            return
        limit = max(engine.config.startup_timeout for engine in starting)
        waits = [asyncio.ensure_future(engine.settled()) for engine in starting]
        _, pending = await asyncio.wait(waits, timeout=limit)
        for wait in pending:
            wait.cancel()

    async def probe(self, backend: Backend) -> None:
        """Ask one backend what it serves (or just whether it answers), and record the result."""
        if backend.engine is not None and not backend.engine.ready.is_set():
            # Not an outage: the engine says itself when it is up, or why it failed.
            backend.reachable, backend.last_error = False, f"managed engine is {backend.engine.state}"
            return
        try:
            if backend.discover:
                models = await self._list_models(backend)
                if models != backend.discovered:
                    log.info("backend %s serves %d models: %s", backend.name, len(models),
                             ", ".join(sorted(models)[:20]))
                self.router.set_discovered(backend, models)
            else:
                async with self.session.get(backend.health_url(), headers=backend.headers,
                                            timeout=_PROBE_TIMEOUT) as response:
                    await response.read()
            self._mark(backend, None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._mark(backend, _describe(exc))

    async def _list_models(self, backend: Backend) -> frozenset[str]:
        if backend.protocol == "ollama":
            url, key, field = backend.url + "/api/tags", "models", "name"
        else:
            url, key, field = backend.endpoint("/models"), "data", "id"
        async with self.session.get(url, headers=backend.headers, timeout=_PROBE_TIMEOUT) as response:
            body = await response.read()
            if response.status != 200:
                raise ValueError(f"{url} answered HTTP {response.status}")
        entries = orjson.loads(body).get(key) or []
        return frozenset(str(e[field]) for e in entries if isinstance(e, dict) and e.get(field))

    def _mark(self, backend: Backend, error: str | None) -> None:
        reachable = error is None
        if backend.reachable is not reachable:
            if reachable:
                log.info("backend %s at %s answers", backend.name, backend.url)
            else:
                log.warning("backend %s at %s does not answer: %s", backend.name, backend.url, error)
        backend.reachable, backend.last_error = reachable, error


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
