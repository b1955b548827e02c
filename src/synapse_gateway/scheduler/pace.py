"""The scheduler's own clocks, read at each use: a simulation that runs time faster scales them down."""

from __future__ import annotations

from typing import Protocol


class Pace(Protocol):
    """How often a blocked wake re-checks for room, how often idle units are swept, and how long one
    residency question may take (the `Scheduler` holds them, so they can be set on it after it is built)."""

    @property
    def poll_interval(self) -> float: ...

    @property
    def sweep_interval(self) -> float: ...

    @property
    def probe_timeout(self) -> float: ...
