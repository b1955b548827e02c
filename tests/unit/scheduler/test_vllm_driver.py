"""The vLLM sleep-mode driver against the faithful fake: both levels, the canary, the restart fallback, and faults."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest

from synapse_gateway.scheduler.drivers.base import LifecycleError, SleepFailed, WakeFailed
from synapse_gateway.scheduler.drivers.vllm import VllmSleepDriver
from tests.fakes.faults import FAULTS, Fault
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


def _restart_of(fake: FakeVLLM, restarts: list[str]) -> Callable[[], Awaitable[None]]:
    async def restart() -> None:
        restarts.append("restart")
        fake.release()
        fake.sleeping_tags.clear()  # a fresh engine starts awake

    return restart


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
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session,
                             restart=_restart_of(vllm, restarts))
    await driver.sleep()
    vllm.fail_next_wake = True
    await driver.wake()
    assert restarts == ["restart"]
    assert await driver.is_resident()


async def test_a_failed_canary_falls_back_to_a_restart(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    """wake_up answers 200 but the engine fails its first request (vllm#15483, #36753): restart it."""
    restarts: list[str] = []
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session,
                             restart=_restart_of(vllm, restarts))
    await driver.sleep()
    vllm.fail_next_canary = True
    await driver.wake()
    assert restarts == ["restart"]
    assert not vllm.fail_next_canary, "the canary reached the engine"


async def test_without_a_restart_a_failed_canary_is_a_failed_wake(vllm: FakeVLLM,
                                                                  session: aiohttp.ClientSession) -> None:
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session)
    await driver.sleep()
    vllm.fail_next_canary = True
    with pytest.raises(WakeFailed, match=r"no process or pod to restart: canary POST /v1/completions answered 500"):
        await driver.wake()


async def test_without_a_restart_a_failed_wake_is_reported(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session)
    await driver.sleep()
    vllm.fail_next_wake = True
    with pytest.raises(WakeFailed, match="no process or pod to restart"):
        await driver.wake()


async def test_sleep_mode_off_is_a_clear_error(session: aiohttp.ClientSession) -> None:
    with FakeVLLM(["m"], sleep_mode=False) as plain:
        driver = VllmSleepDriver(url=plain.url, model="m", session=session)
        with pytest.raises(LifecycleError, match="enable-sleep-mode"):
            await driver.is_resident()


# -- the canary follows the model's task (F18) -----------------------------------------------
async def test_an_embeddings_only_engine_wakes_with_an_embedding_canary(session: aiohttp.ClientSession) -> None:
    with FakeVLLM(["bge-m3"], sleep_mode=True, task="embed") as embed:
        driver = VllmSleepDriver(url=embed.url, model="bge-m3", session=session)
        for _ in range(2):
            await driver.sleep()
            await driver.wake()
        assert await driver.is_resident()
        assert _admin_calls(embed) == ["/sleep?level=1", "/wake_up", "/v1/completions", "/v1/embeddings",
                                       "/sleep?level=1", "/wake_up", "/v1/embeddings"]


async def test_task_embed_asks_for_an_embedding_at_once_and_its_failure_is_a_failed_wake(
    session: aiohttp.ClientSession,
) -> None:
    with FakeVLLM(["bge-m3"], sleep_mode=True, task="embed") as embed:
        driver = VllmSleepDriver(url=embed.url, model="bge-m3", session=session, task="embed")
        await driver.sleep()
        embed.fail_next_canary = True
        with pytest.raises(WakeFailed, match="POST /v1/embeddings answered 500"):
            await driver.wake()
        assert _admin_calls(embed) == ["/sleep?level=1", "/wake_up", "/v1/embeddings"]


async def test_task_generate_does_not_try_an_embedding(session: aiohttp.ClientSession) -> None:
    with FakeVLLM(["bge-m3"], sleep_mode=True, task="embed") as embed:
        driver = VllmSleepDriver(url=embed.url, model="bge-m3", session=session, task="generate")
        await driver.sleep()
        with pytest.raises(WakeFailed, match="canary POST /v1/completions answered 400"):
            await driver.wake()


def test_the_admin_timeout_is_never_below_the_wake_deadline() -> None:
    """F14: a wake allowed 30 minutes must not be cut by a 10-minute client timeout."""
    driver = VllmSleepDriver(url="http://127.0.0.1:1", model="m", session=None,  # type: ignore[arg-type]
                             action_timeout=1800)
    assert driver._action_timeout.total == 1800


# -- every fault of the backend or the network is a LifecycleError (F5) ----------------------
@pytest.mark.parametrize("fault", FAULTS)
async def test_faults_are_lifecycle_errors(vllm: FakeVLLM, session: aiohttp.ClientSession, fault: Fault) -> None:
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session, action_timeout=0.3)
    vllm.admin_fault = fault
    with pytest.raises(LifecycleError, match=r"is_sleeping"):
        await driver.is_resident()
    with pytest.raises(SleepFailed):
        await driver.sleep()
    with pytest.raises(WakeFailed, match="no process or pod to restart"):
        await driver.wake()


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_fault_during_wake_falls_back_to_a_restart(vllm: FakeVLLM, session: aiohttp.ClientSession,
                                                           fault: Fault) -> None:
    restarts: list[str] = []

    async def restart() -> None:
        vllm.admin_fault = None
        await _restart_of(vllm, restarts)()

    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session, action_timeout=0.3,
                             restart=restart)
    await driver.sleep()
    vllm.admin_fault = fault
    await driver.wake()
    assert restarts == ["restart"] and await driver.is_resident()


async def test_a_disconnect_keeps_its_cause(vllm: FakeVLLM, session: aiohttp.ClientSession) -> None:
    driver = VllmSleepDriver(url=vllm.url, model="llama-3.2-8b", session=session)
    vllm.admin_fault = "disconnect"
    with pytest.raises(SleepFailed) as caught:
        await driver.sleep()
    assert isinstance(caught.value.__cause__, LifecycleError)
    assert isinstance(caught.value.__cause__.__cause__, aiohttp.ClientError)
