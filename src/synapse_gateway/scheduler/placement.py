"""Placement policy: which units on a device must or may go so that another one fits (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from .units import Residency, Unit


def holding(units: Sequence[Unit]) -> list[Unit]:
    """Units that hold their full memory: resident, or in doubt after a failed action."""
    return [u for u in units if u.state is not Residency.ASLEEP]


def overflow(units: Sequence[Unit], capacity: int, unit: Unit | None) -> int:
    """Bytes over `capacity` once `unit` is fully resident (<= 0 when it fits); `units` excludes `unit`."""
    extra = 0 if unit is None else unit.memory
    return sum(u.held() for u in units) + extra - capacity


def impossible(units: Sequence[Unit], capacity: int, unit: Unit) -> str | None:
    """Why `unit` can never fit beside `units` whatever is evicted, or None when it can.

    Always-on units never leave, and asleep units keep their sleeping memory, so waiting would only
    hold the device for nothing.
    """
    if unit.memory > capacity:
        return f"{unit.key} needs {_gib(unit.memory)} but device {unit.device} has {_gib(capacity)}"
    pinned = [u for u in units if not u.evictable and u.state is not Residency.ASLEEP]
    if blocking := [u.key for u in pinned if set(u.config.exclusive) & set(unit.config.exclusive)]:
        return f"{unit.key} is exclusive with always-on {', '.join(blocking)}"
    floor = sum(u.held() if not u.evictable else u.sleeping_memory for u in units) + unit.memory
    if floor > capacity:
        return (f"{unit.key} needs {_gib(unit.memory)}; always-on and sleeping units leave "
                f"{_gib(capacity - floor + unit.memory)} of {_gib(capacity)} on device {unit.device}")
    return None


def conflicts(units: Sequence[Unit], unit: Unit | None) -> list[Unit]:
    """Units that must go for `unit` to come in: a shared exclusive group, or its slot group is full."""
    if unit is None:
        return []
    groups = set(unit.config.exclusive)
    present = holding(units)
    found = [u for u in present if groups & set(u.config.exclusive)]
    if unit.slot_group is not None:
        siblings = [u for u in present if u.slot_group == unit.slot_group and u not in found]
        if len(siblings) >= unit.slot_limit:
            found += sorted(siblings, key=lambda u: u.last_used)[:len(siblings) - unit.slot_limit + 1]
    return found


def candidates(units: Sequence[Unit]) -> list[Unit]:
    """Units that may be evicted, in eviction order: lowest priority first, then least recently used."""
    return sorted((u for u in holding(units) if u.evictable), key=lambda u: (u.config.priority, u.last_used))


def eligible(units: Sequence[Unit], at: float) -> list[Unit]:
    """Those of `units` that may go now: idle here, and settled (a unit in doubt serves nobody)."""
    return [u for u in units if u.evictable and u.in_flight == 0
            and (u.state is Residency.UNKNOWN or u.settled_in(at))]


def to_drain(units: Sequence[Unit], needed: int) -> list[Unit]:
    """The first of `units` (in eviction order) that together free `needed` bytes once drained."""
    chosen, freed = [], 0
    for unit in units:
        if freed >= needed:
            break
        chosen.append(unit)
        freed += unit.memory - unit.sleeping_memory
    return chosen


def idle(unit: Unit, at: float) -> bool:
    """Whether the idle sweeper should put `unit` to sleep: idle past its idle_timeout, and settled."""
    timeout = unit.config.idle_timeout
    return (timeout is not None and unit.state in (Residency.RESIDENT, Residency.UNKNOWN)
            and unit.evictable and not unit.in_flight and not unit.waiters
            and unit.idle_for(at) >= timeout and unit.settled_in(at))


def in_doubt(unit: Unit) -> bool:
    """A unit whose residency is unknown and that nobody is waking: its backend should be asked."""
    return (unit.state is Residency.UNKNOWN and not unit.waiters
            and (unit.bringing_in is None or unit.bringing_in.done()))


def adopted(published: object) -> Residency:
    """A state another replica published, as this one counts it: mid-action or unreadable is in doubt."""
    if published in (Residency.RESIDENT, Residency.ASLEEP):
        return Residency(str(published))
    return Residency.UNKNOWN


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
