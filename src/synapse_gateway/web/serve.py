"""The one serve loop of both apps: a runner with the production settings, signals, and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger("synapse.web")


def make_runner(app: web.Application, *, drain_timeout: float, header_timeout: float = 60.0) -> web.AppRunner:
    """The runner every server of this project uses, tests included.

    `handler_cancellation`: a client that goes away cancels its handler, which closes the upstream
    request at once. `keepalive_timeout` also bounds a connection whose request head never completes
    (aiohttp closes an idle handler at that deadline), so a slow-loris client cannot hold a socket.
    """
    return web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=drain_timeout,
                         keepalive_timeout=header_timeout)


def bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port the runner really listens on (`requested` may be 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


async def serve_until_signal(runner: web.AppRunner, host: str, port: int, *,
                             on_listening: Callable[[int], None],
                             before_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Listen, wait for SIGTERM or SIGINT, run `before_stop` (readiness off, a delay), then drain and close."""
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
        await site.start()
        on_listening(bound_port(runner, port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if before_stop is not None:
            await before_stop()
    finally:
        await runner.cleanup()


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed (it is a dependency except on Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
        return
    uvloop.run(main)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; a name that may resolve elsewhere is not."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"
