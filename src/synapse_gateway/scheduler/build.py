"""Builds the scheduler's units and drivers from the config, and finds the unit a request needs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp

from ..backends import Backend
from ..config.schema import GpuConfig, LifecycleConfig
from ..engines.process import EngineFailed, ManagedEngine
from .coordination import Coordinator, LocalCoordinator
from .drivers.always_on import AlwaysOnDriver
from .drivers.base import LifecycleDriver, WakeFailed
from .drivers.ollama import OllamaModelDriver
from .drivers.process import ProcessDriver
from .drivers.vllm import VllmSleepDriver
from .metrics import SchedulerMetrics
from .scheduler import Scheduler
from .units import Unit

log = logging.getLogger("synapse.scheduler")


class Gpu:
    """The scheduler plus the mapping from (backend, model) to the unit that must be resident."""

    def __init__(self, scheduler: Scheduler, backends: dict[str, Backend], session: aiohttp.ClientSession) -> None:
        self.scheduler = scheduler
        self.backends = backends
        self.session = session

    def unit_for(self, backend: Backend, model: str) -> Unit | None:
        """The unit to acquire for a request, or None when the backend is not GPU-scheduled."""
        unit = self.scheduler.units.get(backend.name)
        if unit is not None or backend.lifecycle is None or backend.lifecycle.driver != "ollama":
            return unit
        key = f"{backend.name}/{model}"
        unit = self.scheduler.units.get(key)
        if unit is None and model in backend.discovered:  # only models Ollama has: no unit per typo
            unit = _ollama_unit(backend, backend.lifecycle, model, self.session)
            self.scheduler.add(unit)
        return unit


def managed_by_scheduler(backend: Backend) -> bool:
    """A `process` backend's engine is started by the scheduler on demand, not with the gateway."""
    return backend.lifecycle is not None and backend.lifecycle.driver == "process"


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
    units = [_unit(b, b.lifecycle, session, metrics) for b in backends.values()
             if b.lifecycle is not None and b.lifecycle.driver != "ollama"]
    return Gpu(Scheduler(settings, units, coordinator, metrics), backends, session)


def _unit(backend: Backend, config: LifecycleConfig, session: aiohttp.ClientSession,
          metrics: SchedulerMetrics) -> Unit:
    driver: LifecycleDriver
    if config.driver == "always-on":
        driver = AlwaysOnDriver()
    elif config.driver == "process":
        driver = ProcessDriver(_engine(backend))
    elif config.driver == "vllm-sleep":
        restart = _restarter(backend.engine) if backend.engine is not None else None
        driver = VllmSleepDriver(url=backend.url, model=(backend.static_models or (None,))[0], session=session,
                                 level=config.sleep_level, canary=config.canary, restart=restart,
                                 on_fallback=lambda: metrics.fallbacks.labels(backend.name).inc())
    else:
        from .drivers.kubernetes import KubernetesDriver

        driver = KubernetesDriver.from_config(config, health_url=backend.health_url(), session=session)
    return Unit(key=backend.name, backend=backend.name, config=config, driver=driver, memory=config.memory,
                sleeping_memory=config.sleeping_memory)


def _ollama_unit(backend: Backend, config: LifecycleConfig, model: str, session: aiohttp.ClientSession) -> Unit:
    driver = OllamaModelDriver(url=backend.url, model=model, session=session)
    memory = config.model_memory.get(model, config.memory)
    return Unit(key=f"{backend.name}/{model}", backend=backend.name, config=config, driver=driver, memory=memory,
                slot_group=backend.name, slot_limit=config.max_loaded_models)


def _engine(backend: Backend) -> ManagedEngine:
    if backend.engine is None:
        raise ValueError(f"backend {backend.name}: the process driver needs a `managed:` command to start")
    return backend.engine


def _restarter(engine: ManagedEngine) -> Callable[[], Awaitable[None]]:
    async def restart() -> None:
        await engine.stop()
        await engine.start()
        try:
            await engine.wait_ready(engine.config.startup_timeout)
        except EngineFailed as exc:
            raise WakeFailed(f"restarting {engine.name} failed: {exc}") from exc

    return restart
