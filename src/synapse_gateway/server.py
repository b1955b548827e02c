"""Runs the gateway: listen, serve, and on SIGTERM drain in-flight requests before exiting."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from .app import create_app
from .config import LoadedConfig
from .gateway import GATEWAY_KEY

log = logging.getLogger("synapse")


async def serve(loaded: LoadedConfig, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, let in-flight requests finish, and return."""
    settings = loaded.config.server
    app = create_app(loaded)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=settings.drain_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
    await site.start()
    gc.freeze()  # start-up objects never die: keep them out of every later collection
    log.info("listening on http://%s:%d (config: %s, %s format)", host, _bound_port(runner, port),
             loaded.source, loaded.dialect)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        gateway = app.get(GATEWAY_KEY)
        if gateway is not None:
            gateway.draining = True
        if settings.shutdown_delay:
            log.info("shutting down: readiness is now false; still serving for %gs so load balancers "
                     "can stop sending traffic", settings.shutdown_delay)
            await asyncio.sleep(settings.shutdown_delay)
        in_flight = sum(b.in_flight for b in gateway.backends.values()) if gateway else 0
        log.info("shutting down: not accepting connections, %d requests in flight, waiting up to %gs",
                 in_flight, settings.drain_timeout)
        await runner.cleanup()
        log.info("stopped")


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


def run(loaded: LoadedConfig, host: str, port: int) -> None:
    """Run the gateway until a signal stops it."""
    run_async(serve(loaded, host, port))


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed (it is a dependency except on Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
        return
    uvloop.run(main)
