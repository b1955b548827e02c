"""Run an aiohttp Application on a free localhost port in a background thread with its own loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

from aiohttp import web

T = TypeVar("T")


class BackgroundServer:
    """Serve one aiohttp Application on 127.0.0.1:<free port> from a daemon thread."""

    def __init__(self, app: web.Application, *, shutdown_timeout: float = 0.5,
                 make_runner: Callable[[web.Application], web.AppRunner] | None = None) -> None:
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.make_runner = make_runner
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> str:
        """Start serving and return the base url (http://127.0.0.1:PORT)."""
        if self._loop is not None:
            raise RuntimeError("BackgroundServer already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-backend", daemon=True)
        self._thread.start()
        port = self.call(self._serve)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def call(self, coro_fn: Callable[[], Awaitable[T]], *, timeout: float = 10.0) -> T:
        """Run ``coro_fn()`` on the server's loop and return its result."""
        if self._loop is None:
            raise RuntimeError("BackgroundServer not started")

        async def run() -> T:
            return await coro_fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self) -> None:
        """Stop serving; in-flight requests are cut after ``shutdown_timeout``. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if self._runner is not None:
                self.call(self._runner.cleanup, timeout=self.shutdown_timeout + 10)
            self.call(_cancel_leftover_tasks)
            self.call(loop.shutdown_asyncgens)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = self._runner = None

    async def _serve(self) -> int:
        # handler_cancellation: a client that goes away cancels its handler, as in uvicorn/vLLM.
        if self.make_runner is not None:  # the product's own runner, settings and all
            runner = self.make_runner(self.app)
        else:
            runner = web.AppRunner(
                self.app, shutdown_timeout=self.shutdown_timeout, handler_cancellation=True, access_log=None
            )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _cancel_leftover_tasks() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ServedFake:
    """The serve-on-a-free-port lifecycle every fake shares; subclasses set `app` (and may set the timeout)."""

    app: web.Application
    shutdown_timeout: float = 0.5
    url: str = ""
    _server: BackgroundServer | None = None

    def start(self) -> Self:
        """Serve on a free localhost port in a background thread; sets ``url``."""
        self._server = BackgroundServer(self.app, shutdown_timeout=self.shutdown_timeout)
        self.url = self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests still in flight are cut after ``shutdown_timeout``."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
