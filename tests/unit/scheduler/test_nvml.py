"""NVML readings: a wake that would not fit the memory really free is refused, and usage is exported.

No GPU runs here, so a stand-in `pynvml` module plays NVML's documented Python API (nvmlInit,
nvmlDeviceGetHandleByIndex, nvmlDeviceGetMemoryInfo returning total/free/used, NVMLError).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from synapse_gateway.config.schema import DeviceConfig, GpuConfig
from synapse_gateway.scheduler.coordination import LocalCoordinator
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from synapse_gateway.scheduler.nvml import DeviceMemory
from synapse_gateway.scheduler.scheduler import Scheduler
from tests.unit.scheduler.simulated import SimDriver, SimGpu, sim_unit

GiB = 2**30


@dataclass
class MemoryInfo:
    total: int
    free: int
    used: int


class FakeNvml(types.ModuleType):
    class NVMLError(Exception):
        pass

    def __init__(self, total: int, used: int) -> None:
        super().__init__("pynvml")
        self.total, self.used_bytes, self.initialised = total, used, False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not self.initialised or index != 0:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> MemoryInfo:
        return MemoryInfo(self.total, self.total - self.used_bytes, self.used_bytes)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    fake = FakeNvml(total=16 * GiB, used=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    yield fake


def test_reads_used_and_free(nvml: FakeNvml) -> None:
    nvml.used_bytes = 3 * GiB
    memory = DeviceMemory([DeviceConfig(name="gpu0", memory=16 * GiB, index=0)], None)
    assert memory.available
    assert (memory.used("gpu0"), memory.free("gpu0")) == (3 * GiB, 13 * GiB)
    assert memory.used("other") is None
    memory.close()


def test_absent_nvml_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    memory = DeviceMemory([DeviceConfig(name="gpu0", memory=16 * GiB)], None)
    assert not memory.available and memory.free("gpu0") is None


async def test_a_wake_that_does_not_fit_real_memory_is_refused(nvml: FakeNvml,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    nvml.used_bytes = 12 * GiB  # something outside Synapse holds 12 GiB
    gpu = SimGpu(capacity=16 * GiB)
    driver = SimDriver("big", gpu, memory=8 * GiB)
    scheduler = Scheduler(GpuConfig.model_validate({"memory": 16 * GiB, "max_wait": 30}), [sim_unit(driver)],
                          LocalCoordinator(), SchedulerMetrics(CollectorRegistry()))
    scheduler.poll_interval = 0.01
    await scheduler.start()
    unit = scheduler.units["big"]
    monkeypatch.setattr(scheduler, "_await_real_memory",
                        lambda u, patience=0.05: Scheduler._await_real_memory(scheduler, u, patience))
    with pytest.raises(Exception, match="really free"):
        await scheduler.acquire(unit)
    assert driver.wakes == 0
    nvml.used_bytes = 2 * GiB
    await scheduler.acquire(unit)
    assert driver.wakes == 1
    scheduler.release(unit)
    await scheduler.stop()
