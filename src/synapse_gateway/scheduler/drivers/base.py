"""The one small interface every lifecycle driver implements, and its failures."""

from __future__ import annotations

from typing import Protocol


class LifecycleError(Exception):
    """A wake or sleep that did not complete; the message says what the backend answered."""


class WakeFailed(LifecycleError):
    """The backend could not be made resident (and, where possible, a restart was tried too)."""


class SleepFailed(LifecycleError):
    """The backend could not be put to sleep; its memory must still be counted as held."""


class LifecycleDriver(Protocol):
    """How one schedulable unit (a backend, or one model of an Ollama) changes residency.

    `wake` returns only when the unit can serve requests; `sleep` returns only when its memory is
    free (down to what it keeps while asleep). The scheduler never calls `sleep` while the unit has
    requests in flight, and never calls two actions on one unit at once.
    """

    async def is_resident(self) -> bool:
        """Ask the backend itself (the authority), not the scheduler's own bookkeeping."""
        ...

    async def wake(self) -> None: ...

    async def sleep(self) -> None: ...
