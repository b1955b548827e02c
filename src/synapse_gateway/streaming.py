"""Server-sent events relayed chunk by chunk, and the token usage read from the end of a stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import aiohttp
import orjson
from aiohttp import web

from .accesslog import RequestRecord
from .errors import BackendTimeout, BadGateway, GatewayError, error_event

_TAIL_BYTES = 8192


class UsageTail:
    """Keeps the last few KiB of a stream to read `usage` from its final chunk."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-_TAIL_BYTES:]

    def usage(self) -> dict[str, int] | None:
        """The last `usage` object in the tail, if the backend sent one (stream_options.include_usage)."""
        for event in reversed(self.tail.split(b"\n\n")):
            start = event.find(b"data: {")
            if start < 0 or b'"usage"' not in event:
                continue
            try:
                usage = orjson.loads(event[start + 6:]).get("usage")
            except orjson.JSONDecodeError:
                continue
            if isinstance(usage, dict):
                return usage
        return None


class IdleWatchdog:
    """Fails a stream's pending read after `idle` seconds without data: one timer per stream, re-armed lazily."""

    __slots__ = ("_handle", "_idle", "_loop", "_reader", "expired", "last")

    def __init__(self, reader: aiohttp.StreamReader, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._idle = idle
        self.expired = False
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + idle, self._check)

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        due = self.last + self._idle
        if self._loop.time() >= due:
            self.expired = True
            self._reader.set_exception(TimeoutError())
        else:
            self._handle = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


async def relay(request: web.Request, upstream: aiohttp.ClientResponse, first_chunk: bytes,
                response: web.StreamResponse, record: RequestRecord, idle_timeout: float) -> None:
    """Copy the upstream body to the client as it arrives.

    A failed event stream ends with an error event; any other failed stream (audio) is cut off, so
    that the client sees an incomplete body rather than a truncated file that looks whole.
    """
    sse = upstream.content_type == "text/event-stream"
    await response.prepare(request)
    tail = UsageTail()
    chunk = first_chunk
    failure: GatewayError | None = None
    watchdog = IdleWatchdog(upstream.content, idle_timeout)
    try:
        while chunk:
            await response.write(chunk)
            if sse:
                tail.feed(chunk)
            try:
                chunk = await upstream.content.readany()
            except TimeoutError:  # the watchdog, or the client's read timeout (also a TimeoutError)
                failure = BackendTimeout(f"backend {record.backend} sent nothing for {idle_timeout:g}s")
                break
            except aiohttp.ClientError:
                failure = BadGateway(f"backend {record.backend} dropped the stream")
                break
            watchdog.touch()
        if failure is not None:
            record.error = failure.message
            if not sse:
                if request.transport is not None:
                    request.transport.close()
                return
            separator = b"" if tail.tail.endswith(b"\n\n") or not tail.tail else b"\n\n"
            await response.write(separator + error_event(failure))
        await response.write_eof()
    finally:
        watchdog.cancel()
        _record_usage(record, tail)


def _record_usage(record: RequestRecord, tail: UsageTail) -> None:
    usage = tail.usage()
    if usage is not None:
        record.tokens_in = usage.get("prompt_tokens")
        record.tokens_out = usage.get("completion_tokens")


async def start_event_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """Start an SSE answer before the backend has said anything (its status is then always 200)."""
    response = web.StreamResponse(status=200, headers=headers)
    response.headers["Content-Type"] = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    return response


async def keep_alive_while(response: web.StreamResponse, waiting: Awaitable[None], interval: float,
                           note: str) -> None:
    """Await `waiting`, writing an SSE comment line every `interval` seconds until it is done."""
    task = asyncio.ensure_future(waiting)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                task.result()
                return
            await response.write(f": {note}\n\n".encode())
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def end_event_stream(response: web.StreamResponse, error: GatewayError,
                           record: RequestRecord) -> web.StreamResponse:
    """End a started SSE answer with an error event (nothing else can be said once it has begun)."""
    record.status, record.error = 200, error.message
    await response.write(error_event(error))
    await response.write_eof()
    return response
