"""What a client sent: a JSON body read within its size and time limits, and the protocol both body kinds share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from .errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from .routing import check_model_name as check_model_length

Body = bytes | AsyncIterator[bytes]
_JSON_HEADERS = {"Content-Type": "application/json"}


class BodyFor(Protocol):
    """What to send for a given upstream model name; `replayable` says whether a retry can resend it."""

    @property
    def replayable(self) -> bool: ...

    def __call__(self, upstream_model: str) -> tuple[Body, dict[str, str]]: ...


class JsonBody:
    """A parsed JSON request: its raw bytes when the model keeps its name, else re-serialised once per name."""

    replayable = True

    def __init__(self, payload: dict[str, Any], raw: bytes) -> None:
        self.payload = payload
        self.size = len(raw)
        self.bodies = {payload["model"]: raw}

    def __call__(self, upstream_model: str) -> tuple[Body, dict[str, str]]:
        body = self.bodies.get(upstream_model)
        if body is None:
            body = self.bodies[upstream_model] = orjson.dumps({**self.payload, "model": upstream_model})
        return body, _JSON_HEADERS


class BodyDeadline:
    """Bounds reading a client body: at most `idle` seconds between chunks and `total` seconds in all.

    A client that trickles its body would otherwise hold a connection, and a GPU unit's in-flight
    count, for as long as it likes. The clock starts at the first read that has to wait: a body
    that is already here (the usual case) costs no timer at all.
    """

    __slots__ = ("_deadline", "_idle", "total")

    def __init__(self, *, idle: float, total: float) -> None:
        self._idle = idle
        self.total = total
        self._deadline: float | None = None

    async def read(self, content: aiohttp.StreamReader) -> bytes:
        """The next chunk of `content` (b"" at its end), or 408 when the client is too slow."""
        buffered = content.read_nowait()
        if buffered or content.at_eof():
            return buffered
        now = asyncio.get_running_loop().time()
        if self._deadline is None:
            self._deadline = now + self.total
        budget = min(self._idle, self._deadline - now)
        if budget <= 0:
            raise RequestTimeout(f"the request body took longer than {self.total:g}s to arrive")
        try:
            async with asyncio.timeout(budget):
                chunk: bytes = await content.readany()
        except TimeoutError:
            raise RequestTimeout(f"the client sent no request body data for {budget:g}s") from None
        return chunk


async def read_json_body(request: web.Request, limit: int, deadline: BodyDeadline) -> tuple[dict[str, Any], bytes]:
    """The parsed body and its raw bytes; 413 is decided from Content-Length before reading anything."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    content = request.content
    if content.is_eof():  # the whole body is already here (a small JSON body, usually): take it at once
        raw = content.read_nowait()
    else:
        buffer = bytearray()
        while chunk := await deadline.read(content):
            buffer += chunk
            if len(buffer) > limit:
                break
        raw = bytes(buffer)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    check_model_name(payload.get("model"))
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false", param="stream", code="invalid_type")
    return payload, raw


def check_model_name(model: object) -> None:
    """400 unless `model` is a non-empty string of sane length (checked before it reaches a log line)."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter, e.g. \"model\": \"llama-3.2-8b\"",
                             param="model", code="missing_model" if model is None else "invalid_model")
    check_model_length(model)
