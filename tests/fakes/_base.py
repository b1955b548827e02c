"""Knobs, request records and lifecycle shared by the fake backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from ._openai import BadRequest, Reply, split_text
from .server import ServedFake

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Recorded(NamedTuple):
    """One request as the fake saw it: path with query, parsed JSON body (or None), lower-cased headers."""

    path: str
    body: Any
    headers: dict[str, str]


class Refused(Exception):
    """Raised while admitting a request: answer with ``response`` instead."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def json_response(body: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=content_type)


class FakeBackend(ServedFake):
    """Base of the fakes: failure knobs settable from any thread, records, start/stop/release."""

    def __init__(self, *, reply: str, stream_chunks: int, chunk_delay: float, shutdown_timeout: float = 0.5) -> None:
        self.reply = reply
        self.stream_chunks = stream_chunks
        self.chunk_delay = chunk_delay
        self.shutdown_timeout = shutdown_timeout
        # Failure knobs: plain attributes, read on the loop, so tests may set them at any time.
        self.fail_status: int | None = None
        self.hang = False
        self.drop_after_chunks: int | None = None
        self.first_byte_delay = 0.0
        # Records.
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects = 0
        self.url = ""
        self.app = web.Application(middlewares=[self._record])
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    def release(self) -> None:
        """Clear ``hang`` and let every hung request proceed."""
        self.hang = False
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_waiters, False)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` from the test thread until it holds; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            time.sleep(0.005)

    def paths(self) -> list[str]:
        """The recorded request paths, in order."""
        return [r.path for r in self.requests]


    async def _on_startup(self, app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False

    async def _on_shutdown(self, app: web.Application) -> None:
        self._stopping = True
        self._wake_waiters(True)

    def _wake_waiters(self, cancel: bool) -> None:
        for fut in list(self._waiters):
            if fut.done():
                continue
            if cancel:
                fut.cancel()
            else:
                fut.set_result(None)

    # -- request plumbing ------------------------------------------------------------------
    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Recorded(request.path_qs, body, headers))
        return await handler(request)

    @staticmethod
    async def _json_body(request: web.Request) -> Any:
        """The parsed JSON body; raises BadRequest when it is not valid JSON."""
        raw = await request.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"JSON decode error: {exc}") from None

    @asynccontextmanager
    async def _tracked(self) -> AsyncIterator[None]:
        """Count an inference request in flight; a client that leaves early counts as a disconnect."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        except (asyncio.CancelledError, ConnectionError):
            if not self._stopping:
                self.disconnects += 1
            raise
        finally:
            self.in_flight -= 1

    async def _before_first_byte(self, request: web.Request) -> None:
        """Apply ``hang`` (until released or stopped), then ``first_byte_delay``."""
        while self.hang and not self._stopping:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)
        if self.first_byte_delay:
            await asyncio.sleep(self.first_byte_delay)

    def _drop_now(self, request: web.Request) -> None:
        """Close the connection abruptly: the client sees a truncated body, as when a server dies."""
        if request.transport is not None:
            request.transport.close()

    def _make_reply(self, model: str, prompt_tokens: int, limit: Any = None) -> Reply:
        """The deterministic reply to a request, cut to ``limit`` pieces (finish_reason 'length')."""
        pieces = split_text(self.reply.format(model=model), self.stream_chunks)
        if isinstance(limit, int) and 0 < limit < len(pieces):
            return Reply(model, pieces[:limit], prompt_tokens, "length")
        return Reply(model, pieces, prompt_tokens)

    async def _stream(
        self, request: web.Request, frames: Iterable[bytes], headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """Write ``frames`` one by one, honouring ``chunk_delay`` and ``drop_after_chunks``; cut on stop."""
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for i, frame in enumerate(frames):
            if self._stopping or (self.drop_after_chunks is not None and i >= self.drop_after_chunks):
                self._drop_now(request)
                return resp
            if i and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await resp.write(frame)
        await resp.write_eof()
        return resp

    async def _answer(self, request: web.Request, body: Any, status: int = 200) -> web.StreamResponse:
        """A complete JSON answer, or a dropped connection when ``drop_after_chunks`` is set."""
        if self.drop_after_chunks is not None:
            self._drop_now(request)
            return web.Response()
        return json_response(body, status)
