"""Builds the scheduler's units and drivers from the config: each driver builds itself from its own model."""

from __future__ import annotations

import logging
from typing import assert_never

import aiohttp

from ..backends import Backend
from ..config.schema import (
    AlwaysOnLifecycle,
    GpuConfig,
    KubernetesLifecycle,
    LifecycleConfig,
    OllamaLifecycle,
    ProcessLifecycle,
    VllmSleepLifecycle,
)
from .coordination import Coordinator, LocalCoordinator
from .drivers.always_on import AlwaysOnDriver
from .drivers.base import DriverContext, LifecycleDriver, LifecycleError
from .drivers.ollama import loaded_models
from .drivers.process import ProcessDriver
from .drivers.vllm import VllmSleepDriver
from .gpu import Gpu, ollama_unit
from .metrics import SchedulerMetrics
from .scheduler import Scheduler
from .units import Unit

__all__ = ["Gpu", "build_gpu", "managed_by_scheduler"]

log = logging.getLogger("synapse.scheduler")


def managed_by_scheduler(backend: Backend) -> bool:
    """A `process` backend's engine is started by the scheduler on demand, not with the gateway."""
    return isinstance(backend.lifecycle, ProcessLifecycle)


async def build_gpu(settings: GpuConfig, backends: dict[str, Backend], session: aiohttp.ClientSession,
                    metrics: SchedulerMetrics, *, replica: str) -> Gpu:
    coordinator: Coordinator
    if settings.redis_url:
        from .redis_coordination import RedisCoordinator  # `redis` is only needed with several replicas

        coordinator = RedisCoordinator(settings.redis_url, replica=replica, lease_ttl=settings.lease_ttl,
                                       prefix=settings.redis_prefix)
        await coordinator.connect()
    else:
        coordinator = LocalCoordinator()
    units: list[Unit] = []
    for backend in backends.values():
        if backend.lifecycle is not None:
            context = DriverContext(backend, session, on_fallback=metrics.fallbacks.labels(backend.name).inc)
            units += await _units(backend, backend.lifecycle, context)
    return Gpu(Scheduler(settings, units, coordinator, metrics), backends, session)


async def _units(backend: Backend, config: LifecycleConfig, context: DriverContext) -> list[Unit]:
    """A backend's units at start: one, or for an Ollama one per model it has loaded already."""
    driver: LifecycleDriver
    match config:
        case OllamaLifecycle():
            return await _loaded_ollama_units(backend, config, context)
        case VllmSleepLifecycle():
            driver = VllmSleepDriver.from_config(config, context)
        case ProcessLifecycle():
            driver = ProcessDriver.from_config(config, context)
        case AlwaysOnLifecycle():
            driver = AlwaysOnDriver.from_config(config, context)
        case KubernetesLifecycle():
            from .drivers.kubernetes import KubernetesDriver  # `kubernetes_asyncio` is only needed here

            driver = KubernetesDriver.from_config(config, context)
        case _:
            assert_never(config)
    return [Unit(key=backend.name, backend=backend.name, config=config, driver=driver, memory=config.memory,
                 sleeping_memory=config.sleeping_memory)]


async def _loaded_ollama_units(backend: Backend, config: OllamaLifecycle, context: DriverContext) -> list[Unit]:
    """Models Ollama holds already count against the budget from the start; the rest get units on demand."""
    try:
        loaded = await loaded_models(context.session, backend.url)
    except LifecycleError as exc:
        log.warning("backend %s: cannot list the models Ollama has loaded (%s); counting none", backend.name, exc)
        return []
    return [ollama_unit(backend, config, name, context) for name in loaded.values()]
