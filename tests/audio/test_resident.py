"""Resident: one load under concurrent use, load failures reported and retried, idle unload."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from synapse_gateway.audio.resident import ModelLoadFailed, Resident


class Loads:
    """A loader that counts its calls and takes a little while, like a real model."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls = 0
        self.fail_first = fail_first
        self.threads: set[str] = set()

    def __call__(self) -> str:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(0.1)
        if self.fail_first and self.calls == 1:
            raise OSError("disk on fire")
        return f"model #{self.calls}"


async def test_concurrent_users_share_one_load_off_the_loop() -> None:
    loads = Loads()
    resident = Resident("stt", "m", loads)

    async def use() -> str:
        async with resident.use() as model:
            return model

    assert await asyncio.gather(*(use() for _ in range(5))) == ["model #1"] * 5
    assert loads.calls == 1 and threading.main_thread().name not in loads.threads
    assert resident.status()["loads"] == 1 and resident.status()["load_s"] >= 0.1


async def test_a_failed_load_is_reported_and_retried() -> None:
    resident = Resident("tts", "v", Loads(fail_first=True))
    with pytest.raises(ModelLoadFailed, match="could not be loaded"):
        async with resident.use():
            pass
    async with resident.use() as model:
        assert model == "model #2"


async def test_a_cancelled_user_does_not_abandon_the_load() -> None:
    loads = Loads()
    resident = Resident("stt", "m", loads)

    async def use() -> str:
        async with resident.use() as model:
            return model

    first = asyncio.create_task(use())
    await asyncio.sleep(0.02)
    first.cancel()
    assert await use() == "model #1" and loads.calls == 1


async def test_idle_unload_waits_for_users_and_idle_time() -> None:
    resident = Resident("stt", "m", Loads())
    async with resident.use():
        assert not resident.unload_if_idle(0.0, now=time.monotonic() + 100)  # in use
    assert not resident.unload_if_idle(60.0)
    assert resident.unload_if_idle(60.0, now=time.monotonic() + 61) and not resident.loaded
    async with resident.use() as model:
        assert model == "model #2"
