"""The scheduler's refusals, and how a failure becomes a client's 503 or a line in the log."""

from __future__ import annotations

import logging

from ..errors import BackendUnavailable, GatewayError
from .coordination import CoordinationError
from .drivers.base import LifecycleError, WakeFailed
from .units import Unit

log = logging.getLogger("synapse.scheduler")


class QueueFull(BackendUnavailable):
    code = "queue_full"


class NoRoom(WakeFailed):
    """The unit cannot be made to fit: never (always-on units hold the rest), or not within max_wait."""


def refusal(unit: Unit, cause: BaseException | None) -> GatewayError:
    """What a waiter is answered when `unit` could not be brought in; the cause itself stays in the log."""
    if isinstance(cause, GatewayError):
        return cause
    if isinstance(cause, NoRoom):
        return BackendUnavailable(str(cause), retry_after=30)
    if isinstance(cause, CoordinationError):
        return BackendUnavailable(f"replicas could not agree on device {unit.device}; retry", retry_after=5)
    return BackendUnavailable(f"{unit.key} could not be made resident (the gateway log says why)", retry_after=10)


def log_failure(what: str, exc: BaseException, *, level: int = logging.ERROR) -> None:
    """Our own failures are logged plainly; anything else is a bug, logged with its traceback."""
    if isinstance(exc, LifecycleError | CoordinationError | TimeoutError | OSError | GatewayError):
        log.log(level, "%s failed: %s", what, exc or type(exc).__name__)
    else:
        log.error("%s failed unexpectedly", what, exc_info=exc)
