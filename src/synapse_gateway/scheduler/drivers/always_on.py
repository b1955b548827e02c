"""A backend that is always resident: counted against the budget, never evicted."""

from __future__ import annotations


class AlwaysOnDriver:
    """Nothing to do: the unit is resident from start to end."""

    async def is_resident(self) -> bool:
        return True

    async def wake(self) -> None:
        return None

    async def sleep(self) -> None:
        return None
