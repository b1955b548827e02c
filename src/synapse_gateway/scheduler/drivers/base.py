"""The one small interface every lifecycle driver implements, its failures, and where foreign errors become them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
import orjson

if TYPE_CHECKING:
    from ...backends import Backend

log = logging.getLogger("synapse.scheduler.drivers")


class LifecycleError(Exception):
    """A wake, sleep or residency check that did not complete; the message says what the backend answered."""


class WakeFailed(LifecycleError):
    """The backend could not be made resident (and, where possible, a restart was tried too)."""


class SleepFailed(LifecycleError):
    """The backend could not be put to sleep; its memory must still be counted as held."""


class LifecycleDriver(Protocol):
    """How one schedulable unit (a backend, or one model of an Ollama) changes residency.

    `wake` returns only when the unit can serve requests; `sleep` returns only when its memory is
    free (down to what it keeps while asleep). The scheduler never calls `sleep` while the unit has
    requests in flight, and never calls two actions on one unit at once.

    Every method raises only LifecycleError (WakeFailed, SleepFailed): whatever the backend, the
    network or a client library throws is mapped by `lifecycle_errors`, so the scheduler catches one
    tree. Cancellation is never mapped; the scheduler's own deadline arrives as one.
    """

    async def is_resident(self) -> bool:
        """Ask the backend itself (the authority), not the scheduler's own bookkeeping."""
        ...

    async def wake(self) -> None: ...

    async def sleep(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DriverContext:
    """What a driver may need besides its config: its backend, the shared session, a fallback counter."""

    backend: Backend
    session: aiohttp.ClientSession
    on_fallback: Callable[[], None] = lambda: None


# What talking to a backend can throw: transport failures, timeouts of the driver's own requests,
# answers that are not JSON or not the expected shape, and processes that cannot be started.
FOREIGN: tuple[type[Exception], ...] = (
    aiohttp.ClientError,  # ServerDisconnectedError, ClientPayloadError, ClientConnectorError, ...
    TimeoutError,
    OSError,
    orjson.JSONDecodeError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
)


@contextmanager
def lifecycle_errors(what: str, failure: type[LifecycleError] = LifecycleError) -> Iterator[None]:
    """The edge of a driver: any exception inside becomes `failure` with `what` and the cause in its message.

    A WakeFailed or SleepFailed that already is a `failure` passes unchanged; any other
    LifecycleError becomes one, prefixed with `what`. An
    exception outside the expected foreign ones is a bug, so it is also logged with its traceback;
    it is still mapped, because an unmapped error would kill the scheduler task that called the
    driver.
    """
    try:
        yield
    except LifecycleError as exc:
        if isinstance(exc, failure) and type(exc) is not LifecycleError:
            raise  # a WakeFailed in a wake, a SleepFailed in a sleep: it says what failed already
        raise failure(f"{what}: {exc}") from exc  # e.g. a refused POST while sleeping is a SleepFailed
    except FOREIGN as exc:
        raise failure(f"{what}: {describe(exc)}") from exc
    except Exception as exc:
        log.exception("unexpected error in %s", what)
        raise failure(f"{what}: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """`ServerDisconnectedError: Server disconnected`, or the type alone when the message is empty."""
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def json_object(raw: bytes, what: str) -> dict[str, object]:
    """Parse an answer that must be a JSON object; LifecycleError naming `what` when it is not."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise LifecycleError(f"{what} is not JSON ({exc}): {raw[:100].decode(errors='replace')!r}") from exc
    if not isinstance(value, dict):
        raise LifecycleError(f"{what} is JSON but not an object: {raw[:100].decode(errors='replace')!r}")
    return value
