"""A backend that is always resident: counted against the budget, never evicted."""

from __future__ import annotations

from typing import Self

from ...config.schema import AlwaysOnLifecycle
from .base import DriverContext


class AlwaysOnDriver:
    """Nothing to do: the unit is resident from start to end."""

    @classmethod
    def from_config(cls, config: AlwaysOnLifecycle, context: DriverContext) -> Self:
        return cls()

    async def is_resident(self) -> bool:
        return True

    async def wake(self) -> None:
        return None

    async def sleep(self) -> None:
        return None
