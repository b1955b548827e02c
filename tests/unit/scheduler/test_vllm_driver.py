"""The vLLM sleep-mode driver against the faithful fake: both levels, the canary, and the restart fallback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from synapse_gateway.scheduler.drivers.base import WakeFailed
from synapse_gateway.scheduler.drivers.vllm import VllmSleepDriver
from tests.fakes.vllm import FakeVLLM


@pytest.fixture
def vllm() -> Iterator[FakeVLLM]:
    with FakeVLLM(["llama-3.2-8b"], sleep_mode=True) as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _admin_calls(fake: FakeVLLM) -> list[str]:
    return [r.path for r in fake.requests if not r.path.startswith(("/is_sleeping", "/v1/models"))]


async def test_level_1_round_trip_with_canary(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    driver = VllmSleepDriver(url=vllm.url, model=None, session=session, level=1)
    assert await driver.is_resident()
    await driver.sleep()
    assert vllm.is_sleeping and not await driver.is_resident()
    await driver.wake()
    assert await driver.is_resident()
    assert _admin_calls(vllm) == ["/sleep?level=1", "/wake_up", "/v1/completions"]
    assert vllm.requests_while_sleeping == 0


async def test_level_2_reloads_weights(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session, level=2)
    await driver.sleep()
    await driver.wake()
    assert _admin_calls(vllm) == ["/sleep?level=2", "/wake_up?tags=weights", "/collective_rpc",
                                  "/wake_up?tags=kv_cache", "/reset_prefix_cache", "/v1/completions"]
    assert vllm.requests_with_stale_weights == 0


async def test_a_failed_wake_falls_back_to_a_restart(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    restarts: list[str] = []
    fallbacks: list[str] = []

    async def restart() -> None:
        restarts.append("restart")
        vllm.release()
        vllm.sleeping_tags.clear()  # a fresh engine starts awake

    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session, restart=restart,
                             on_fallback=lambda: fallbacks.append("x"))
    await driver.sleep()
    vllm.fail_next_wake = True
    await driver.wake()
    assert restarts == ["restart"] and fallbacks == ["x"]
    assert await driver.is_resident()


async def test_without_a_restart_a_failed_wake_is_reported(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session)
    await driver.sleep()
    vllm.fail_next_wake = True
    with pytest.raises(WakeFailed, match="no process or pod to restart"):
        await driver.wake()


async def test_sleep_mode_off_is_a_clear_error(session: aiohttp.ClientSession) -> None:
    with FakeVLLM(["m"], sleep_mode=False) as plain:
        driver = VllmSleepDriver(url=plain.url, model="m", session=session)
        with pytest.raises(WakeFailed, match="enable-sleep-mode"):
            await driver.is_resident()
