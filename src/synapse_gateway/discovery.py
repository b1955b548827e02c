"""Resolves model names for the handlers, and keeps what each backend serves (and whether it answers) fresh."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from .backends import Backend
from .config.schema import DiscoveryConfig
from .engines.process import EngineState
from .errors import ModelNotFound
from .routing import MAX_MODEL_NAME, Resolution, Router, check_model_name

log = logging.getLogger("synapse.discovery")
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_NEGATIVE_CACHE_SIZE = 4096


class ProbeFailed(Exception):
    """A backend answered, but not with what a model listing looks like."""


class Catalog:
    """The one place a model name is resolved; keeps the router's discovered models and reachability fresh.

    Handlers call `resolve` (requests), `public_models` (GET /v1/models) and `find_model`
    (GET /v1/models/{id}); they never touch the router themselves.
    """

    def __init__(self, router: Router, session: aiohttp.ClientSession, settings: DiscoveryConfig) -> None:
        self.router = router
        self.session = session
        self.settings = settings
        # Names that were unknown even after a refresh, by digest: the memory per entry does not
        # depend on the name, and the entry count is bounded.
        self._misses: OrderedDict[bytes, float] = OrderedDict()
        self._last_refresh = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def resolve(self, model: str) -> Resolution:
        """Where a request for `model` goes: exact name, alias, pattern, discovered, then the fallback backend.

        A name that no rule matches triggers one refresh of the discovered models (shared with concurrent
        callers, at most one per `min_refresh_gap`), unless the same name missed within `negative_ttl`.
        The route's `fallbacks` models come resolved in `Resolution.fallbacks`.

        Raises InvalidRequest (400) for a name longer than MAX_MODEL_NAME, before anything is cached,
        and ModelNotFound (404) when nothing serves the name and there is no fallback backend.
        """
        check_model_name(model)
        resolution = self.router.lookup(model, use_fallback=False)
        if resolution is None:
            await self._refresh_on_miss(model)
            resolution = self.router.lookup(model)
        if resolution is None:
            raise ModelNotFound(model)
        return resolution

    async def public_models(self) -> dict[str, str]:
        """Every listable model name and the backend that owns it (configured names first, then discovered).

        When backends are to be discovered and none has listed anything yet (start-up, or all were down),
        refresh first, at most once per `min_refresh_gap`.
        """
        if not self.router.discovered and any(b.discover for b in self.router.backends.values()):
            await self._refresh_when_due()
        return self.router.public_models()

    async def find_model(self, name: str) -> str | None:
        """The backend that owns the listed model `name`, or None; a miss refreshes as `resolve` does.

        Only listed names are found (configured, aliases, discovered); a name that merely matches a
        pattern is not a model of its own. Over-long names are None without any refresh.
        """
        owner = self.router.public_models().get(name)
        if owner is None and len(name) <= MAX_MODEL_NAME:
            await self._refresh_on_miss(name)
            owner = self.router.public_models().get(name)
        return owner

    async def start(self) -> None:
        """Probe every backend once, then keep refreshing in the background; never raises for a backend."""
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

    async def _refresh_on_miss(self, model: str) -> None:
        """Refresh for an unknown name, unless it missed recently; remember it if it is still unknown."""
        key = _digest(model)
        now = time.monotonic()
        expires = self._misses.get(key)
        if expires is not None:
            if expires > now:
                return
            del self._misses[key]
        await self._refresh_when_due()
        if self.router.lookup(model, use_fallback=False) is None:
            self._misses[key] = time.monotonic() + self.settings.negative_ttl
            while len(self._misses) > _NEGATIVE_CACHE_SIZE:
                self._misses.popitem(last=False)

    async def _refresh_when_due(self) -> None:
        """Refresh unless one ran within `min_refresh_gap`; then wait for one still running instead."""
        await self._engines_settled()
        if time.monotonic() - self._last_refresh >= self.settings.min_refresh_gap:
            await self.refresh()
        elif self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)

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
        """Ask one backend what it serves (or just whether it answers), and record the result.

        Never raises (cancellation aside): a failure, expected or not, marks the backend unreachable,
        so a managed engine's `on_ready` and the start-up refresh cannot fail because of a backend.
        """
        if backend.engine is not None and not backend.engine.ready.is_set():
            # Not an outage: the engine says itself when it is up, or why it failed.
            backend.reachable, backend.last_error = False, f"managed engine is {backend.engine.state}"
            return
        try:
            await self._probe(backend)
        except (aiohttp.ClientError, TimeoutError, ProbeFailed) as exc:
            self._mark(backend, _describe(exc))
        except Exception as exc:
            log.exception("probing backend %s failed unexpectedly", backend.name)
            self._mark(backend, f"probe failed: {_describe(exc)}")
        else:
            self._mark(backend, None)

    async def _probe(self, backend: Backend) -> None:
        if not backend.discover:
            async with self.session.get(backend.health_url(), headers=backend.headers,
                                        timeout=_PROBE_TIMEOUT) as response:
                await response.read()
            return
        models = await self._list_models(backend)
        if models != backend.discovered:
            log.info("backend %s serves %d models: %s", backend.name, len(models), ", ".join(sorted(models)[:20]))
        self.router.set_discovered(backend, models)

    async def _list_models(self, backend: Backend) -> frozenset[str]:
        if backend.protocol == "ollama":
            url, key, field = backend.url + "/api/tags", "models", "name"
        else:
            url, key, field = backend.endpoint("/models"), "data", "id"
        async with self.session.get(url, headers=backend.headers, timeout=_PROBE_TIMEOUT) as response:
            body = await response.read()
            if response.status != 200:
                raise ProbeFailed(f"{url} answered HTTP {response.status}")
        return _model_names(body, url, key, field)

    def _mark(self, backend: Backend, error: str | None) -> None:
        reachable = error is None
        if backend.reachable is not reachable:
            if reachable:
                log.info("backend %s at %s answers", backend.name, backend.url)
            else:
                log.warning("backend %s at %s does not answer: %s", backend.name, backend.url, error)
        backend.reachable, backend.last_error = reachable, error


def _model_names(body: bytes, url: str, key: str, field: str) -> frozenset[str]:
    """The names in a model listing `{key: [{field: name}, ...]}`; ProbeFailed for any other shape."""
    expected = f"a JSON object with a `{key}` list"
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProbeFailed(f"{url} did not answer JSON (expected {expected})") from exc
    if not isinstance(document, dict):
        raise ProbeFailed(f"{url} answered {_json_kind(document)}, expected {expected}")
    if key not in document:
        raise ProbeFailed(f"{url} answered a JSON object without `{key}`, expected {expected}")
    entries = document[key]
    if not isinstance(entries, list):
        raise ProbeFailed(f"{url} answered a JSON object whose `{key}` is {_json_kind(entries)}, "
                          f"expected {expected}")
    return frozenset(e[field] for e in entries if isinstance(e, dict) and isinstance(e.get(field), str) and e[field])


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _digest(model: str) -> bytes:
    return hashlib.blake2b(model.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
