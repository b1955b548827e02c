"""Building the scheduler from the config: each driver from its own model, and the process driver's failures."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from synapse_gateway.backends import Backend
from synapse_gateway.config.schema import BackendConfig, GpuConfig, ManagedConfig, Timeouts, parse_lifecycle
from synapse_gateway.engines.process import ManagedEngine
from synapse_gateway.scheduler.build import build_gpu, managed_by_scheduler
from synapse_gateway.scheduler.drivers.always_on import AlwaysOnDriver
from synapse_gateway.scheduler.drivers.base import DriverContext, WakeFailed
from synapse_gateway.scheduler.drivers.kubernetes import KubernetesDriver
from synapse_gateway.scheduler.drivers.process import ProcessDriver
from synapse_gateway.scheduler.drivers.vllm import VllmSleepDriver
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from tests.fakes.vllm import FakeVLLM


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def backend(name: str, url: str = "http://127.0.0.1:9", **config: Any) -> Backend:
    return Backend.from_config(name, BackendConfig.model_validate({"url": url, **config}), Timeouts())


def with_engine(b: Backend, session: aiohttp.ClientSession, command: list[str]) -> Backend:
    managed = ManagedConfig(command=command, startup_timeout=5, restart="never", stop_grace=1)
    b.engine = ManagedEngine(b.name, managed, b.health_url("/health"), session)
    return b


async def test_each_driver_is_built_from_its_own_lifecycle(session: aiohttp.ClientSession) -> None:
    backends = {
        "v": backend("v", lifecycle={"driver": "vllm-sleep", "memory": "6GiB", "sleep_level": 2, "canary": False,
                                     "task": "embed", "wake_timeout": "20m"}),
        "k": backend("k", lifecycle={"driver": "kubernetes", "memory": "6GiB", "namespace": "llm",
                                     "deployment": "tts", "wake_timeout": "5m"}),
        "a": backend("a", lifecycle={"driver": "always-on", "memory": "2GiB"}),
        "p": with_engine(backend("p", lifecycle={"driver": "process", "memory": "2GiB"}), session, ["true"]),
        "plain": backend("plain"),
    }
    gpu = await build_gpu(GpuConfig.model_validate({"memory": "32GiB"}), backends, session,
                          SchedulerMetrics(CollectorRegistry()), replica="test")
    units = gpu.scheduler.units
    assert sorted(units) == ["a", "k", "p", "v"]
    v, k = units["v"].driver, units["k"].driver
    assert isinstance(v, VllmSleepDriver) and (v.level, v.canary, v.task) == (2, False, "embed")
    assert v._action_timeout.total == 1200 and v.restart is None
    assert isinstance(k, KubernetesDriver) and (k.namespace, k.deployment) == ("llm", "tts")
    assert k.polling.wake_timeout == 300
    assert isinstance(units["a"].driver, AlwaysOnDriver) and isinstance(units["p"].driver, ProcessDriver)
    assert [managed_by_scheduler(b) for b in backends.values()] == [False, False, False, True, False]


async def test_a_restart_after_a_failed_wake_is_counted(session: aiohttp.ClientSession) -> None:
    """A managed vLLM is the restart path of its sleep-mode driver; each restart counts as a fallback."""
    with FakeVLLM(["m"], sleep_mode=True) as fake:
        serve = [sys.executable, "-c", "import time; time.sleep(60)"]
        b = with_engine(backend("v", url=fake.url, protocol="vllm", models=["m"]), session, serve)
        fallbacks: list[str] = []
        config = parse_lifecycle({"driver": "vllm-sleep", "memory": "6GiB"})
        context = DriverContext(b, session, on_fallback=lambda: fallbacks.append("x"))
        driver = VllmSleepDriver.from_config(config, context)  # type: ignore[arg-type]
        try:
            await driver.sleep()
            fake.fail_next_canary = True
            await driver.wake()  # the canary fails: the engine is restarted and the fallback counted
            assert fallbacks == ["x"] and b.engine is not None and b.engine.ready.is_set()
        finally:
            await b.engine.stop()  # type: ignore[union-attr]


async def test_an_engine_that_cannot_start_is_wake_failed_and_left_stopped(session: aiohttp.ClientSession) -> None:
    b = with_engine(backend("p", lifecycle={"driver": "process", "memory": "2GiB"}), session,
                    ["/nonexistent/engine", "--port", "9"])
    driver = ProcessDriver.from_config(parse_lifecycle({"driver": "process", "memory": "2GiB"}),  # type: ignore[arg-type]
                                       DriverContext(b, session))
    with pytest.raises(WakeFailed, match="starting engine p"):
        await driver.wake()
    assert not await driver.is_resident()
    assert b.engine is not None and str(b.engine.state) == "stopped"  # nothing left half-started
