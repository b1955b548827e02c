"""The Ollama driver and the GPU facade for Ollama: one unit per model as Ollama names it, faults as LifecycleErrors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from synapse_gateway.backends import Backend
from synapse_gateway.config.schema import BackendConfig, GpuConfig, Timeouts
from synapse_gateway.errors import BackendUnavailable, ModelNotFound
from synapse_gateway.scheduler.build import build_gpu
from synapse_gateway.scheduler.drivers.base import LifecycleError, SleepFailed, WakeFailed
from synapse_gateway.scheduler.drivers.ollama import OllamaModelDriver, canonical, loaded_models
from synapse_gateway.scheduler.gpu import Gpu
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from synapse_gateway.scheduler.units import Residency
from tests.fakes.faults import FAULTS, Fault
from tests.fakes.ollama import FakeOllama

GiB = 2**30


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama({"llama3:latest": 5 * GiB, "qwen2.5:7b": 5 * GiB, "phi3:mini": 2 * GiB}) as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def ollama_backend(fake: FakeOllama, **lifecycle: Any) -> Backend:
    config = BackendConfig.model_validate({"url": fake.url, "protocol": "ollama", "lifecycle": {
        "driver": "ollama", "memory": "5GiB", "max_loaded_models": 2, **lifecycle}})
    backend = Backend.from_config("ollama", config, Timeouts())
    backend.discovered, backend.reachable = frozenset(fake.store.sizes), True  # what discovery would record
    return backend


async def gpu_for(backend: Backend, session: aiohttp.ClientSession, memory: str = "16GiB") -> Gpu:
    metrics = SchedulerMetrics(CollectorRegistry())
    return await build_gpu(GpuConfig.model_validate({"memory": memory}), {backend.name: backend}, session,
                           metrics, replica="test")


@pytest.mark.parametrize(("name", "expected"), [
    ("llama3", "llama3:latest"),
    ("LLaMA3:Latest", "llama3:latest"),
    ("registry.ollama.ai/library/llama3", "llama3:latest"),
    ("hf.co/bartowski/Qwen2.5-7B-GGUF:Q4_K_M", "hf.co/bartowski/qwen2.5-7b-gguf:q4_k_m"),
    ("my.registry:5000/team/model", "my.registry:5000/team/model:latest"),
])
def test_canonical_names_follow_ollama(name: str, expected: str) -> None:
    assert canonical(name) == expected


# -- F8: short tags and case map to one unit; unknown models are refused, not unbudgeted --------
async def test_short_tags_and_case_share_one_unit(ollama: FakeOllama, session: aiohttp.ClientSession) -> None:
    backend = ollama_backend(ollama)
    gpu = await gpu_for(backend, session)
    units = {gpu.unit_for(backend, name) for name in ("llama3", "LLAMA3", "llama3:latest", "Llama3:LATEST")}
    [unit] = units
    assert unit is not None and unit.key == "ollama/llama3:latest"
    assert list(gpu.scheduler.units) == ["ollama/llama3:latest"]
    await gpu.scheduler.acquire(unit)  # woken under the budget, by Ollama's own name
    gpu.scheduler.release(unit)
    assert ollama.loaded == ["llama3:latest"]


async def test_a_model_ollama_does_not_list_is_refused_not_sent_unbudgeted(
    ollama: FakeOllama, session: aiohttp.ClientSession
) -> None:
    backend = ollama_backend(ollama)
    gpu = await gpu_for(backend, session)
    with pytest.raises(ModelNotFound):
        gpu.unit_for(backend, "mistral")
    backend.reachable = None  # discovery has not answered yet
    with pytest.raises(BackendUnavailable):
        gpu.unit_for(backend, "mistral")
    assert gpu.scheduler.units == {}


async def test_model_memory_is_matched_as_ollama_matches_names(ollama: FakeOllama,
                                                               session: aiohttp.ClientSession) -> None:
    backend = ollama_backend(ollama, model_memory={"PHI3:mini": "2GiB", "llama3": "6GiB"})
    gpu = await gpu_for(backend, session)
    phi, llama = gpu.unit_for(backend, "phi3:mini"), gpu.unit_for(backend, "llama3:latest")
    assert phi is not None and phi.memory == 2 * GiB
    assert llama is not None and llama.memory == 6 * GiB


async def test_models_loaded_at_start_are_counted_as_resident(ollama: FakeOllama,
                                                              session: aiohttp.ClientSession) -> None:
    await OllamaModelDriver(url=ollama.url, model="qwen2.5:7b", session=session).wake()  # loaded by someone else
    backend = ollama_backend(ollama)
    gpu = await gpu_for(backend, session, memory="8GiB")
    await gpu.scheduler.start()
    try:
        unit = gpu.scheduler.units["ollama/qwen2.5:7b"]
        assert unit.state is Residency.RESIDENT and gpu.scheduler.used("gpu0") == 5 * GiB
        assert gpu.unit_for(backend, "QWEN2.5:7b") is unit
        llama = gpu.unit_for(backend, "llama3")
        assert llama is not None
        await gpu.scheduler.acquire(llama)  # 5 + 5 > 8: qwen must be unloaded first
        gpu.scheduler.release(llama)
        assert ollama.loaded == ["llama3:latest"] and ollama.unloads == ["qwen2.5:7b"]
    finally:
        await gpu.scheduler.stop()


async def test_an_unreachable_ollama_at_start_counts_nothing(session: aiohttp.ClientSession) -> None:
    with FakeOllama() as fake:
        backend = ollama_backend(fake)
    gpu = await gpu_for(backend, session)  # the fake is gone: /api/ps cannot be read
    assert gpu.scheduler.units == {}


# -- the driver ----------------------------------------------------------------------------
async def test_wake_loads_and_sleep_unloads(ollama: FakeOllama, session: aiohttp.ClientSession) -> None:
    driver = OllamaModelDriver(url=ollama.url, model="phi3:mini", session=session)
    assert not await driver.is_resident()
    await driver.wake()
    assert await driver.is_resident() and await loaded_models(session, ollama.url) == {"phi3:mini": "phi3:mini"}
    await driver.sleep()
    assert not await driver.is_resident() and ollama.unloads == ["phi3:mini"]


async def test_a_refused_load_is_wake_failed(ollama: FakeOllama, session: aiohttp.ClientSession) -> None:
    driver = OllamaModelDriver(url=ollama.url, model="mistral", session=session)
    with pytest.raises(WakeFailed, match="Ollama answered 404"):
        await driver.wake()


@pytest.mark.parametrize("fault", FAULTS)
async def test_faults_are_lifecycle_errors(ollama: FakeOllama, session: aiohttp.ClientSession, fault: Fault) -> None:
    driver = OllamaModelDriver(url=ollama.url, model="phi3:mini", session=session, load_timeout=0.3)
    await driver.wake()
    ollama.admin_fault = fault
    if fault != "hang":  # /api/ps has its own 30 s budget: a hang is covered by wake and sleep below
        with pytest.raises(LifecycleError, match="api/ps"):
            await driver.is_resident()
    with pytest.raises(SleepFailed, match="unloading phi3:mini"):
        await driver.sleep()
    with pytest.raises(WakeFailed, match="loading phi3:mini"):
        await driver.wake()
