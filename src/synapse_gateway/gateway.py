"""The gateway's shared parts, built whole once per app in its lifespan and hung on the app."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .access.checkpoint import SpendCheckpoint
from .access.control import AccessControl
from .access.keyring import Keyring
from .access.limits import Limiter, MemoryLimiter
from .accesslog import AccessLog
from .backends import Backend
from .balancer import Balancer
from .config import LoadedConfig
from .config.schema import ServerConfig
from .defaults import DEFAULT_SOURCE
from .discovery import Catalog
from .engines.process import Liveness, ManagedEngine
from .forwarding.admission import Admission
from .forwarding.proxy import Proxy
from .metrics import Metrics
from .routing import Router
from .scheduler.build import build_gpu, managed_by_scheduler
from .scheduler.gpu import Gpu
from .scheduler.metrics import SchedulerMetrics
from .state import StateDatabase
from .storage.ledger import UsageLedger

log = logging.getLogger("synapse")
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


@dataclass(eq=False)
class Gateway:
    """Everything a request handler needs: routing, forwarding, the GPU scheduler, metrics, state."""

    loaded: LoadedConfig
    backends: dict[str, Backend]
    catalog: Catalog
    proxy: Proxy
    metrics: Metrics
    session: aiohttp.ClientSession
    access_log: AccessLog
    gpu: Gpu | None
    engines: list[ManagedEngine]
    # Engines started with the gateway (not on demand by the scheduler): readiness waits for them.
    boot_engines: list[ManagedEngine]
    state: StateDatabase
    keyring: Keyring
    access: AccessControl
    ledger: UsageLedger | None
    checkpoint: SpendCheckpoint
    draining: bool = False
    ready: bool = False
    settings: ServerConfig = field(init=False)
    started_at: float = field(default_factory=time.time)

    @classmethod
    async def create(cls, loaded: LoadedConfig, session: aiohttp.ClientSession, keyring: Keyring,
                     state: StateDatabase) -> Gateway:
        """Build every part with its collaborators; nothing is started yet."""
        config = loaded.config
        backends = {name: Backend.from_config(name, b, config.timeouts) for name, b in config.backends.items()}
        router = Router.from_config(config, backends)
        metrics = Metrics()
        catalog = Catalog(router, session, config.discovery)
        engines: list[ManagedEngine] = []
        for name, backend_config in config.backends.items():
            if backend_config.managed is not None:
                backend = backends[name]
                managed = backend_config.managed
                backend.engine = ManagedEngine(name, managed, backend.health_url(managed.health), session,
                                               on_ready=functools.partial(catalog.probe, backend),
                                               liveness=Liveness(managed.health_interval, managed.health_timeout,
                                                                 managed.health_failures))
                engines.append(backend.engine)
        gpu = None
        if config.gpu is not None:
            gpu = await build_gpu(config.gpu, backends, session, SchedulerMetrics(metrics.registry),
                                  replica=uuid.uuid4().hex[:12])
        proxy = Proxy(session, Balancer(config.routing), metrics, Admission.for_gateway(gpu),
                      max_response_size=config.server.max_response_size)
        access_log = AccessLog(sys.stderr.buffer if config.server.access_log else None)
        boot = [b.engine for b in backends.values() if b.engine is not None and not managed_by_scheduler(b)]
        access = AccessControl(config.auth, new_limiter(config.redis_url, config.redis_prefix))
        usage = config.usage
        ledger = UsageLedger(state, metrics.registry, buffer_size=usage.buffer_size, batch_size=usage.batch_size,
                             flush_interval=usage.flush_interval) if usage.enabled else None
        checkpoint = SpendCheckpoint(access.limiter, keyring, state)
        return cls(loaded, backends, catalog, proxy, metrics, session, access_log, gpu, engines, boot, state,
                   keyring, access, ledger, checkpoint)

    def __post_init__(self) -> None:
        self.settings = self.loaded.config.server  # read on every request: one attribute, not three

    @property
    def engines_settled(self) -> bool:
        """Whether every engine started with the gateway has come up or failed (readiness waits for this)."""
        return all(engine.is_settled for engine in self.boot_engines)

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends.values())

    @property
    def counts_usage(self) -> bool:
        """Whether each request's token usage is wanted (the ledger, or keys that are limited in tokens)."""
        return self.ledger is not None or self.keyring.required

    async def start(self) -> list[asyncio.Task[None]]:
        """Start the engines, the scheduler and discovery; engines keep starting in the returned tasks."""
        await self.access.limiter.start()
        if self.ledger is not None:
            await self.ledger.start()
        await self.keyring.start()
        await self.checkpoint.start()
        starting = [asyncio.create_task(engine.start(), name=f"start-{engine.name}") for engine in self.boot_engines]
        if self.gpu is not None:
            await asyncio.gather(*starting)  # the scheduler asks running engines whether they are resident
            await self.gpu.scheduler.start()
        await self.catalog.start()
        self.report_backends()
        self.ready = True
        return starting

    async def close(self, starting: list[asyncio.Task[None]]) -> None:
        self.ready = False
        self.access_log.flush()
        if self.gpu is not None:
            await self.gpu.scheduler.close()
        await self.catalog.stop()
        await asyncio.gather(*(engine.stop() for engine in self.engines), *starting, return_exceptions=True)
        await self.keyring.close()
        await self.checkpoint.close()
        if self.ledger is not None:
            await self.ledger.close()
        await self.access.limiter.close()
        await self.state.close()

    def report_backends(self) -> None:
        """Say at start-up which backends answer, what they serve, and how to add more."""
        for backend in self.backends.values():
            if backend.engine is not None and not backend.reachable:
                log.info("backend %s (%s): starting its managed engine", backend.name, backend.url)
            elif backend.reachable:
                models = sorted(backend.discovered or backend.static_models)
                log.info("backend %s (%s, %s) answers; models: %s", backend.name, backend.protocol,
                         backend.url, ", ".join(models[:20]) or "none listed")
            else:
                log.warning("backend %s (%s, %s) does not answer yet: %s", backend.name, backend.protocol,
                            backend.url, backend.last_error)
        if self.loaded.source == DEFAULT_SOURCE:
            log.info("running the embedded default config; to add backends, write a config file "
                     "(see docs/config.md) and start `synapse serve --config FILE`")


def new_session(settings: ServerConfig) -> aiohttp.ClientSession:
    """One pooled client session for all upstream traffic (never one per request).

    `Accept-Encoding: identity`: answers are relayed as they come, and the gateway reads usage and
    errors from them, so a compressed body would reach clients mislabelled. The keep-alive time stays
    under the 5 s that uvicorn-based engines (vLLM) keep an idle connection, so a pooled connection
    is never reused just as the backend closes it.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=settings.max_connections_per_backend,
                                     keepalive_timeout=4.0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
                                 headers={"Accept-Encoding": "identity"}, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=None))


def new_limiter(redis_url: str | None, prefix: str) -> Limiter:
    """Limits shared by every replica through Redis, or this process's own."""
    if redis_url is None:
        return MemoryLimiter()
    from .access.redis_limits import RedisLimiter

    return RedisLimiter(redis_url, prefix=prefix)


def lifespan(loaded: LoadedConfig, keyring: Keyring,
             state: StateDatabase) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup context: build the gateway, start it, and close everything at exit."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        session = new_session(loaded.config.server)
        try:
            gateway = await Gateway.create(loaded, session, keyring, state)
            app[GATEWAY_KEY] = gateway
            starting = await gateway.start()
            try:
                yield
            finally:
                await gateway.close(starting)
        finally:
            await session.close()

    return context
