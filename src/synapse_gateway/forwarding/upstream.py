"""One attempt's exchange with a backend; the one edge where aiohttp and timeout failures become gateway errors."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from ..backends import Backend
from ..body import Body
from ..errors import (
    BackendClosed,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    BadGateway,
    GatewayError,
)

log = logging.getLogger("synapse.upstream")
_ERROR_BODY_LIMIT = 64 * 1024
# What a backend may answer 200 with: JSON, an event stream, audio, or a transcript as plain text.
# An HTML page (a login portal, an ingress's error page) is never an API answer.
NOT_AN_ANSWER = ("text/html",)


# What a backend exchange may raise; `upstream_error` maps each to the gateway's error, in one place.
# (A try/except at each call site costs nothing when nothing fails, unlike a context manager object.)
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def upstream_error(backend: Backend, stage: str, exc: BaseException) -> GatewayError:
    """The gateway's error for an aiohttp or timeout failure while talking to `backend` during `stage`."""
    if isinstance(exc, aiohttp.ClientError):
        own = _own_cause(exc)
        # The client's body failed while streaming up (a slow upload): the client's error, not the backend's.
        return own if own is not None else _transport_error(backend, stage, exc)
    return BackendTimeout(f"backend {backend.name} timed out waiting for {stage}")


def _transport_error(backend: Backend, stage: str, exc: aiohttp.ClientError) -> GatewayError:
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is both
        return BackendTimeout(f"backend {backend.name} timed out waiting for {stage}")
    if isinstance(exc, aiohttp.ClientConnectorError):  # nothing was sent: the same deployment may be tried again
        return BackendUnavailable(f"backend {backend.name} is unreachable: {exc.strerror or type(exc).__name__}",
                                  repeatable=True)
    closed = isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
    if closed and stage == "the response":  # closed or reset before a byte of the answer came back
        return BackendClosed(f"backend {backend.name} closed the connection without answering", repeatable=True)
    if closed:
        return BadGateway(f"backend {backend.name} closed the connection during {stage}")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return BadGateway(f"backend {backend.name} sent a malformed answer during {stage}")
    return BadGateway(f"backend {backend.name} failed during {stage}: {type(exc).__name__}")


def _own_cause(exc: BaseException) -> GatewayError | None:
    """A GatewayError that aiohttp wrapped: raised by the request body's own generator (a slow client)."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, GatewayError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


async def send(session: aiohttp.ClientSession, backend: Backend, url: str, body: Body,
               headers: dict[str, str]) -> aiohttp.ClientResponse:
    """POST `body` and wait for the response head within the backend's connect and first-byte limits."""
    try:
        return await session.post(url, data=body, headers=headers, timeout=backend.client_timeout)
    except TRANSPORT_ERRORS as exc:
        raise upstream_error(backend, "the response", exc) from exc


async def read_capped(upstream: aiohttp.ClientResponse, backend: Backend, limit: int) -> bytes:
    """A non-streamed answer, read whole but never past `limit` bytes (502 beyond it)."""
    declared = upstream.content_length
    if declared is not None and declared > limit:
        raise BadGateway(f"backend {backend.name} answered {declared} bytes; the limit for a non-streamed "
                         f"answer is {limit} (server.max_response_size)")
    data = bytearray()
    try:
        if declared is not None:  # bounded already: aiohttp reads it in one go
            return await upstream.read()
        while chunk := await upstream.content.readany():
            data += chunk
            if len(data) > limit:
                raise BadGateway(f"backend {backend.name} answered more than {limit} bytes; the limit for a "
                                 "non-streamed answer is server.max_response_size")
    except TRANSPORT_ERRORS as exc:
        raise upstream_error(backend, "the response body", exc) from exc
    return bytes(data)


async def status_error(upstream: aiohttp.ClientResponse, backend: Backend) -> GatewayError | None:
    """The error for an answer that must not reach the client as it is, or None to pass it through.

    Passed through: 2xx API answers and 4xx answers carrying an OpenAI error envelope (the client's
    mistake, told by the backend). Everything else is the backend's failure, logged with its body
    and answered with a sanitised message.
    """
    status = upstream.status
    if status < 300 and not upstream.content_type.startswith(NOT_AN_ANSWER):
        return None
    if 400 <= status < 500 and status not in (401, 403, 407, 429):
        return None  # decided on the body: see `client_error`
    snippet = await _snippet(upstream)
    log.warning("backend %s answered HTTP %d (%s): %s", backend.name, status, upstream.content_type, snippet)
    if status < 300:
        return BadGateway(f"backend {backend.name} answered with an HTML page, not an API answer")
    if status == 429:
        return BackendRateLimited(f"backend {backend.name} is rate limiting requests",
                                  retry_after=retry_after(upstream))
    if status in (401, 403, 407):
        return BadGateway(f"backend {backend.name} refused the gateway's credentials (HTTP {status}); "
                          "check its api_key or headers in the config")
    if status == 503:
        return BackendUnavailable(f"backend {backend.name} is unavailable (HTTP 503)",
                                  retry_after=retry_after(upstream) or 5)
    if status == 504:
        return BackendTimeout(f"backend {backend.name} answered HTTP 504")
    return BadGateway(f"backend {backend.name} answered HTTP {status}")


def client_error(status: int, data: bytes, backend: Backend) -> GatewayError | None:
    """A 4xx body without an OpenAI envelope becomes the gateway's envelope (same status); None passes it."""
    if _is_openai_error(data):
        return None
    text = data[:300].decode("utf-8", "replace")
    return BackendRejected(f"backend {backend.name} answered HTTP {status}: {text}", status=status)


def retry_after(upstream: aiohttp.ClientResponse) -> int | None:
    """The backend's Retry-After in whole seconds, when it gave one as a number."""
    value = upstream.headers.get("Retry-After", "").strip()
    return int(value) if value.isdigit() else None


async def _snippet(upstream: aiohttp.ClientResponse) -> str:
    try:
        async with asyncio.timeout(5):
            data = await upstream.content.read(_ERROR_BODY_LIMIT)
    except (TimeoutError, aiohttp.ClientError):
        return "(no body)"
    return data[:500].decode("utf-8", "replace")


def _is_openai_error(data: bytes) -> bool:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)
