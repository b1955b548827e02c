"""Admission: what one attempt must hold before its bytes go upstream, released on every way out.

Each requirement is a `Gate`. Today: a managed engine that must be serving, and a GPU unit that
must be resident (the scheduler may have to wake it). Later gates (keys, rates, budgets) plug in
here, so the attempt loop never learns what it waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from ..balancer import Target
from ..engines.process import EngineFailed
from ..errors import BackendUnavailable, GatewayError
from ..scheduler.gpu import Gpu

T = TypeVar("T")
# Called while a request waits, every `interval` seconds, with a note saying what it waits for; a
# stream uses it to send keep-alive comments.
Heartbeat = Callable[[str], Awaitable[None]]
Release = Callable[[], None]


class Gate(Protocol):
    """One requirement of an attempt at `target`."""

    def must_wait(self, target: Target) -> bool:
        """Whether `enter` would have to wait (so a stream should start its keep-alives first)."""
        ...

    async def enter(self, target: Target, heartbeat: Heartbeat | None) -> Release | None:
        """Hold the requirement, waiting if needed; the returned callable gives it back."""
        ...


async def wait_with_heartbeat(waiting: Awaitable[T], heartbeat: Heartbeat | None, interval: float, note: str,
                              abandoned: Callable[[T], None]) -> T:
    """Await `waiting`, calling `heartbeat` every `interval` seconds until it is done.

    If this wait is cancelled (the client left) after `waiting` had already succeeded, what it
    obtained is handed to `abandoned`, so that nothing acquired for a departed request leaks.
    """
    if heartbeat is None:  # awaited in this very task: no moment between its success and our return
        return await waiting
    task = asyncio.ensure_future(waiting)
    try:
        while not task.done():
            await heartbeat(note)
            await asyncio.wait({task}, timeout=interval)
        return await asyncio.shield(task)
    except BaseException:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is None:
            abandoned(task.result())
        raise


class EngineGate:
    """A managed engine that is (re)starting must be serving before a request is sent to it."""

    keepalive_interval = 10.0  # a waiting stream's keep-alive comment, as the GPU scheduler's default

    def must_wait(self, target: Target) -> bool:
        engine = target.backend.engine
        return engine is not None and not engine.ready.is_set()

    async def enter(self, target: Target, heartbeat: Heartbeat | None) -> Release | None:
        engine = target.backend.engine
        if engine is None or engine.ready.is_set():
            return None
        try:
            await wait_with_heartbeat(engine.wait_ready(engine.config.startup_timeout), heartbeat,
                                      interval=self.keepalive_interval,
                                      note=f"waiting for engine {engine.name} to start",
                                      abandoned=lambda _: None)
        except EngineFailed as exc:
            raise BackendUnavailable(f"backend {target.backend.name} is not serving: {exc}") from exc
        return None


class GpuGate:
    """The target's GPU unit must be resident, counted in flight until the attempt ends."""

    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu

    def must_wait(self, target: Target) -> bool:
        try:
            unit = self.gpu.unit_for(target.backend, target.upstream_model)
        except GatewayError:  # refused (an Ollama model it does not have): `enter` says so, in turn
            return True
        return unit is not None and self.gpu.scheduler.must_wait(unit)

    async def enter(self, target: Target, heartbeat: Heartbeat | None) -> Release | None:
        unit = self.gpu.unit_for(target.backend, target.upstream_model)
        if unit is None:
            return None
        scheduler = self.gpu.scheduler

        def release(_: object = None) -> None:
            scheduler.release(unit)

        await wait_with_heartbeat(scheduler.acquire(unit), heartbeat if scheduler.must_wait(unit) else None,
                                  interval=scheduler.settings.keepalive_interval,
                                  note=f"waiting for {unit.key} to wake", abandoned=release)
        return release


class Admission:
    """Holds every gate for one attempt; a refusal is a GatewayError the attempt loop decides on."""

    def __init__(self, gates: Sequence[Gate]) -> None:
        self.gates = tuple(gates)

    @classmethod
    def for_gateway(cls, gpu: Gpu | None) -> Admission:
        # The GPU first: a unit's wake is what starts an on-demand engine.
        return cls([*([GpuGate(gpu)] if gpu is not None else []), EngineGate()])

    def must_wait(self, target: Target) -> bool:
        return any(gate.must_wait(target) for gate in self.gates)

    def refused(self, target: Target) -> None:
        """The target refused a connection: a managed engine that looked ready is checked again now."""
        engine = target.backend.engine
        if engine is not None:
            engine.notice_refused()

    def hold(self, target: Target, heartbeat: Heartbeat | None = None) -> Held:
        """`async with admission.hold(target):` enters every gate in order and leaves them in reverse,
        whatever way the attempt ends."""
        return Held(self.gates, target, heartbeat)


class Held:
    """The gates one attempt holds (a plain class, not a generator: it is entered on every request)."""

    __slots__ = ("gates", "heartbeat", "releases", "target")

    def __init__(self, gates: tuple[Gate, ...], target: Target, heartbeat: Heartbeat | None) -> None:
        self.gates = gates
        self.target = target
        self.heartbeat = heartbeat
        self.releases: list[Release] = []

    async def __aenter__(self) -> None:
        try:
            for gate in self.gates:
                release = await gate.enter(self.target, self.heartbeat)
                if release is not None:
                    self.releases.append(release)
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        while self.releases:
            self.releases.pop()()
