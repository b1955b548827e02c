"""Sends one attempt to a backend and maps every transport failure to one small exception tree."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import aiohttp

from .backends import Backend
from .errors import BackendTimeout, BackendUnavailable, BadGateway, GatewayError

FailureKind = Literal["connect", "timeout", "status", "protocol"]
Body = bytes | AsyncIterator[bytes]


class AttemptFailed(Exception):
    """An attempt that failed before any byte reached the client, so another deployment may be tried."""

    def __init__(self, kind: FailureKind, message: str, *, status: int | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    def to_gateway_error(self) -> GatewayError:
        """What the client sees once no attempt is left."""
        if self.kind == "timeout":
            return BackendTimeout(self.message)
        if self.kind == "connect" or self.status == 503:
            retry = int(self.retry_after) if self.retry_after and self.retry_after.isdigit() else 5
            return BackendUnavailable(self.message, retry_after=retry)
        return BadGateway(self.message)


def transport_failure(backend: Backend, stage: str, exc: BaseException) -> AttemptFailed:
    """The AttemptFailed for an aiohttp or timeout exception raised while talking to `backend`."""
    if isinstance(exc, TimeoutError):
        return AttemptFailed("timeout", f"backend {backend.name} timed out waiting for {stage}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return AttemptFailed("connect", f"backend {backend.name} is unreachable: {exc.strerror or type(exc).__name__}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return AttemptFailed("connect", f"backend {backend.name} closed the connection during {stage}")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return AttemptFailed("protocol", f"backend {backend.name} sent a malformed answer during {stage}")
    return AttemptFailed("protocol", f"backend {backend.name} failed during {stage}: {type(exc).__name__}")


TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError)


async def send(session: aiohttp.ClientSession, backend: Backend, url: str, body: Body,
               headers: dict[str, str]) -> aiohttp.ClientResponse:
    """POST `body` and wait for the response head within the backend's connect and first-byte limits."""
    try:
        return await session.post(url, data=body, headers=headers, timeout=backend.client_timeout)
    except TRANSPORT_ERRORS as exc:
        raise transport_failure(backend, "the response", exc) from exc
