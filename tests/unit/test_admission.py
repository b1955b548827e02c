"""Admission holds what an attempt needs and gives it back on every way out, a cancelled wait included."""

from __future__ import annotations

import asyncio

import pytest

from synapse_gateway.forwarding.admission import wait_with_heartbeat


async def test_a_wait_cancelled_just_as_it_succeeds_gives_back_what_it_got() -> None:
    """F13: the client leaves at the moment the unit is handed over; the unit must not stay in flight."""
    given_back: list[str] = []
    granted = asyncio.Event()

    async def acquire() -> str:
        granted.set()
        return "unit"

    async def keep_alive(note: str) -> None:
        pass

    async def wait() -> str:  # a stream waiting with keep-alives: the acquire runs as its own task
        return await wait_with_heartbeat(acquire(), keep_alive, 1.0, "waking", given_back.append)

    task = asyncio.ensure_future(wait())
    await granted.wait()  # acquire has returned; the waiter has not resumed yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert given_back == ["unit"]


async def test_a_wait_cancelled_before_it_succeeds_cancels_the_acquire() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()
    given_back: list[str] = []

    async def acquire() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "unit"

    async def keep_alive(note: str) -> None:
        pass

    task = asyncio.ensure_future(wait_with_heartbeat(acquire(), keep_alive, 1.0, "waking", given_back.append))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set() and given_back == []


async def test_a_waiting_stream_gets_a_heartbeat_every_interval() -> None:
    beats: list[str] = []

    async def heartbeat(note: str) -> None:
        beats.append(note)

    async def acquire() -> str:
        while len(beats) < 3:  # done only once the waiter has kept the stream alive three times
            await asyncio.sleep(0.01)
        return "unit"

    assert await wait_with_heartbeat(acquire(), heartbeat, 0.05, "waking", lambda _: None) == "unit"
    assert len(beats) >= 3 and set(beats) == {"waking"}
