"""Runs the gateway: listen, serve, and on SIGTERM drain in-flight requests before exiting."""

from __future__ import annotations

import asyncio
import gc
import logging

from .app import create_app
from .config import LoadedConfig
from .gateway import GATEWAY_KEY
from .web.serve import is_loopback, make_runner, run_async, serve_until_signal

log = logging.getLogger("synapse")


async def serve(loaded: LoadedConfig, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, let in-flight requests finish, and return."""
    settings = loaded.config.server
    app = create_app(loaded)
    runner = make_runner(app, drain_timeout=settings.drain_timeout, header_timeout=settings.header_timeout)

    def listening(bound: int) -> None:
        gc.freeze()  # start-up objects never die: keep them out of every later collection
        log.info("listening on http://%s:%d (config: %s, %s format)", host, bound, loaded.source, loaded.dialect)
        if not loaded.config.auth.required and not is_loopback(host):
            log.warning("listening on %s with no API key required: anyone who can reach this port can use every "
                        "model. Set `auth: {mode: required, master_key: ...}` (see docs/security.md).", host)

    async def drain() -> None:
        gateway = app.get(GATEWAY_KEY)
        if gateway is not None:
            gateway.draining = True
        if settings.shutdown_delay:
            log.info("shutting down: readiness is now false; still serving for %gs so load balancers "
                     "can stop sending traffic", settings.shutdown_delay)
            await asyncio.sleep(settings.shutdown_delay)
        log.info("shutting down: not accepting connections, %d requests in flight, waiting up to %gs",
                 gateway.in_flight if gateway else 0, settings.drain_timeout)

    await serve_until_signal(runner, host, port, on_listening=listening, before_stop=drain)
    log.info("stopped")


def run(loaded: LoadedConfig, host: str, port: int) -> None:
    """Run the gateway until a signal stops it."""
    run_async(serve(loaded, host, port))
