"""The gateway's shared parts, built once per app in its lifespan and hung on the app."""

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

from .accesslog import AccessLog
from .backends import Backend
from .balancer import Balancer
from .config import LoadedConfig
from .defaults import DEFAULT_SOURCE
from .discovery import Catalog
from .engines.process import ManagedEngine
from .metrics import Metrics
from .proxy import Proxy
from .routing import Router
from .scheduler.build import Gpu, build_gpu, managed_by_scheduler
from .scheduler.metrics import SchedulerMetrics

log = logging.getLogger("synapse")
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


@dataclass(eq=False)
class Gateway:
    """Everything a request handler needs: routing, balancing, upstream session, metrics, state."""

    loaded: LoadedConfig
    backends: dict[str, Backend]
    router: Router
    balancer: Balancer
    metrics: Metrics
    session: aiohttp.ClientSession
    catalog: Catalog
    proxy: Proxy
    access_log: AccessLog
    gpu: Gpu | None = None
    draining: bool = False
    ready: bool = False
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, loaded: LoadedConfig, session: aiohttp.ClientSession) -> Gateway:
        config = loaded.config
        backends = {name: Backend.from_config(name, b, config.timeouts) for name, b in config.backends.items()}
        router = Router.from_config(config, backends)
        balancer = Balancer(config.routing)
        metrics = Metrics()
        catalog = Catalog(router, session, config.discovery)
        proxy = Proxy(session, router, balancer, metrics)
        access_log = AccessLog(sys.stderr.buffer if config.server.access_log else None)
        for name, backend_config in config.backends.items():
            if backend_config.managed is not None:
                backend = backends[name]
                backend.engine = ManagedEngine(name, backend_config.managed,
                                               backend.health_url(backend_config.managed.health), session)
                backend.engine.on_ready = functools.partial(catalog.probe, backend)
        return cls(loaded, backends, router, balancer, metrics, session, catalog, proxy, access_log)

    @property
    def engines(self) -> list[ManagedEngine]:
        return [b.engine for b in self.backends.values() if b.engine is not None]

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


def new_session() -> aiohttp.ClientSession:
    """One pooled client session for all upstream traffic (never one per request)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
                                 cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None))


def lifespan(loaded: LoadedConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup context: build the gateway, discover backends, and close everything at exit."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        session = new_session()
        gateway = Gateway.build(loaded, session)
        app[GATEWAY_KEY] = gateway
        starting = [asyncio.create_task(b.engine.start()) for b in gateway.backends.values()
                    if b.engine is not None and not managed_by_scheduler(b)]
        if loaded.config.gpu is not None:
            await asyncio.gather(*starting)  # the scheduler asks running engines whether they are resident
            gateway.gpu = await build_gpu(loaded.config.gpu, gateway.backends, session,
                                          SchedulerMetrics(gateway.metrics.registry), replica=uuid.uuid4().hex[:12])
            gateway.proxy.gpu = gateway.gpu
            await gateway.gpu.scheduler.start()
        await gateway.catalog.start()
        gateway.report_backends()
        gateway.ready = True
        try:
            yield
        finally:
            gateway.ready = False
            gateway.access_log.flush()
            if gateway.gpu is not None:
                await gateway.gpu.scheduler.stop()
                await gateway.gpu.scheduler.coordinator.close()
            await gateway.catalog.stop()
            await asyncio.gather(*(engine.stop() for engine in gateway.engines), *starting,
                                 return_exceptions=True)
            await session.close()

    return context
