"""Answers relayed to the client chunk by chunk, and the token usage read from the end of a stream."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..accesslog import RequestRecord
from ..backends import Backend
from ..errors import BackendTimeout, BadGateway, GatewayError, error_event
from ..web.errors import STARTED
from ..web.responses import SSE_HEADERS
from .upstream import TRANSPORT_ERRORS, upstream_error

_TAIL_BYTES = 8192


class UsageTail:
    """Keeps the last few KiB of a stream to read `usage` from its final chunk."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-_TAIL_BYTES:]

    def usage(self) -> dict[str, Any] | None:
        """The last `usage` object in the tail, if the backend sent one (stream_options.include_usage)."""
        for event in reversed(_EVENT_END.split(self.tail)):
            if b'"usage"' not in event:
                continue
            data = _data_of(event)
            usage = data.get("usage") if data is not None else None
            if isinstance(usage, dict):
                return usage
        return None


# SSE events end with a blank line, whichever line ending the server uses (sse-starlette sends \r\n).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _data_of(event: bytes) -> dict[str, Any] | None:
    """The JSON object of an event's `data:` field (`data: {` or `data:{`), if it is one."""
    start = event.find(b"data:")
    if start < 0:
        return None
    try:
        data = orjson.loads(event[start + 5:].strip())
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


class UsageRemover:
    """Takes the final usage-only event out of a stream whose client did not ask for it.

    The gateway asks every counted stream for its usage (`stream_options.include_usage`); a client
    that did not ask must not get an extra chunk with empty `choices` (code that reads
    `chunk.choices[0]` breaks on it). Whole events are passed on as they complete; a partial one
    waits for its end (bounded: an event over 64 KiB is passed on as it is).
    """

    __slots__ = ("carry",)
    _MAX_CARRY = 65536

    def __init__(self) -> None:
        self.carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.carry + chunk if self.carry else chunk
        end = max(_end_of(data, b"\n\n"), _end_of(data, b"\r\n\r\n"), _end_of(data, b"\r\r"))
        if end == 0:  # no event has ended yet
            if len(data) > self._MAX_CARRY:
                self.carry = b""
                return data
            self.carry = data
            return b""
        whole, self.carry = data[:end], data[end:]
        if b'"usage":{' in whole or b'"usage": {' in whole:
            pieces = _EVENT_END.split(whole)
            ends = _EVENT_END.findall(whole)
            whole = b"".join(event + ending for event, ending in zip(pieces, ends, strict=False)
                             if not _usage_only(event))
        return whole

    def rest(self) -> bytes:
        rest, self.carry = self.carry, b""
        return rest


def _end_of(data: bytes, separator: bytes) -> int:
    """Where the last event ending with `separator` ends in `data` (0: none does)."""
    found = data.rfind(separator)
    return found + len(separator) if found >= 0 else 0


def _usage_only(event: bytes) -> bool:
    """Whether one SSE event is the usage-only chunk (`choices` empty, `usage` set)."""
    if b'"usage"' not in event:
        return False
    data = _data_of(event)
    return data is not None and data.get("choices") == [] and isinstance(data.get("usage"), dict)


def record_usage(record: RequestRecord, usage: object) -> None:
    """Keep the token counts of a `usage` object (or a transcription's seconds of audio), only when
    they are non-negative numbers."""
    if not isinstance(usage, dict):
        return
    if usage.get("type") == "duration":  # speech-to-text, as OpenAI reports it
        seconds = usage.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            record.audio_seconds = float(seconds)
        return
    record.tokens_in = _count(usage.get("prompt_tokens"))
    record.tokens_out = _count(usage.get("completion_tokens"))


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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
                response: web.StreamResponse, record: RequestRecord, backend: Backend) -> None:
    """Copy the upstream body to the client as it arrives.

    A failed event stream ends with an error event; any other failed stream (audio) is cut off, so
    that the client sees an incomplete body rather than a truncated file that looks whole.
    """
    sse = upstream.content_type == "text/event-stream"
    if not response.prepared:
        await response.prepare(request)
    request[STARTED] = True
    tail = UsageTail()
    remover = UsageRemover() if sse and record.hide_usage else None
    chunk = first_chunk
    failure: GatewayError | None = None
    idle = backend.timeouts.stream_idle
    watchdog = IdleWatchdog(upstream.content, idle)
    try:
        while chunk:
            await response.write(chunk if remover is None else remover.feed(chunk))
            if sse:
                tail.feed(chunk)
            try:
                chunk = await upstream.content.readany()
            except TRANSPORT_ERRORS as exc:
                failure = upstream_error(backend, "the stream", exc)
                if isinstance(failure, BackendTimeout):  # the watchdog, or the client's read timeout
                    failure = BackendTimeout(f"backend {backend.name} sent nothing for {idle:g}s")
                else:
                    failure = BadGateway(f"backend {backend.name} dropped the stream")
                break
            watchdog.touch()
        if remover is not None and remover.carry:
            await response.write(remover.rest())
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
        if not upstream.headers.get("Content-Encoding"):
            record_usage(record, tail.usage())


def event_stream_response(headers: dict[str, str], status: int = 200) -> web.StreamResponse:
    """An SSE answer's head: unbuffered all the way to the client."""
    return web.StreamResponse(status=status, headers={**headers, **SSE_HEADERS})


async def end_event_stream(request: web.Request, response: web.StreamResponse, error: GatewayError,
                           record: RequestRecord) -> web.StreamResponse:
    """End a started SSE answer with an error event (nothing else can be said once it has begun)."""
    record.status, record.error = 200, error.message
    if not response.prepared:
        await response.prepare(request)
    await response.write(error_event(error))
    await response.write_eof()
    return response
