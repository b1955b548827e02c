"""Sends one attempt to a backend and maps every transport failure to one small exception tree."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import aiohttp

from .backends import Backend
from .errors import BackendTimeout, BackendUnavailable, BadGateway, GatewayError

FailureKind = Literal["connect", "timeout", "status", "protocol"]


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


@contextmanager
def transport_errors(backend: Backend, stage: str) -> Iterator[None]:
    """Turn aiohttp and timeout exceptions raised while talking to `backend` into AttemptFailed."""
    try:
        yield
    except TimeoutError as exc:
        raise AttemptFailed("timeout", f"backend {backend.name} timed out waiting for {stage}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise AttemptFailed("connect", f"backend {backend.name} is unreachable: "
                                       f"{exc.strerror or type(exc).__name__}") from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise AttemptFailed("connect", f"backend {backend.name} closed the connection during {stage}") from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        raise AttemptFailed("protocol", f"backend {backend.name} sent a malformed answer during {stage}") from exc
    except aiohttp.ClientError as exc:
        raise AttemptFailed("protocol", f"backend {backend.name} failed during {stage}: "
                                        f"{type(exc).__name__}") from exc


async def send(session: aiohttp.ClientSession, backend: Backend, url: str, body: bytes,
               headers: dict[str, str]) -> aiohttp.ClientResponse:
    """POST `body` and wait for the response head within the backend's connect and first-byte limits."""
    timeouts = backend.timeouts
    timeout = aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect)
    with transport_errors(backend, "the response"):
        async with asyncio.timeout(timeouts.first_byte):
            return await session.post(url, data=body, headers=headers, timeout=timeout)
