"""The GPU facade a request uses: the scheduler, and the unit that must be resident for (backend, model)."""

from __future__ import annotations

import aiohttp

from ..backends import Backend
from ..config.schema import OllamaLifecycle
from ..errors import BackendUnavailable, ModelNotFound
from .drivers.base import DriverContext
from .drivers.ollama import OllamaModelDriver, canonical, model_memory
from .scheduler import Scheduler
from .units import Unit


class Gpu:
    """The scheduler plus the mapping from (backend, model) to the unit that must be resident."""

    def __init__(self, scheduler: Scheduler, backends: dict[str, Backend], session: aiohttp.ClientSession) -> None:
        self.scheduler = scheduler
        self.backends = backends
        self.session = session

    def unit_for(self, backend: Backend, model: str) -> Unit | None:
        """The unit to acquire for a request, or None when the backend is not GPU-scheduled.

        An Ollama with a lifecycle is never used without a unit: a model it does not list is refused
        (404; 503 while its list is not known yet), because Ollama would load it outside the budget.
        """
        unit = self.scheduler.units.get(backend.name)
        if unit is not None or not isinstance(backend.lifecycle, OllamaLifecycle):
            return unit
        name = canonical(model)
        unit = self.scheduler.units.get(ollama_key(backend, name))
        if unit is not None:
            return unit
        listed = {canonical(m): m for m in (*backend.static_models, *backend.discovered)}
        if name not in listed:
            if backend.reachable:
                raise ModelNotFound(model)
            raise BackendUnavailable(f"backend {backend.name} has not listed its models yet", retry_after=5)
        unit = ollama_unit(backend, backend.lifecycle, listed[name], DriverContext(backend, self.session))
        self.scheduler.add(unit)
        return unit


def ollama_key(backend: Backend, model: str) -> str:
    """`ollama/llama3:latest`: one unit per model as Ollama names it, whatever spelling a request used."""
    return f"{backend.name}/{canonical(model)}"


def ollama_unit(backend: Backend, config: OllamaLifecycle, model: str, context: DriverContext) -> Unit:
    """One model of an Ollama backend; its models share the backend's `max_loaded_models` slots."""
    driver = OllamaModelDriver.from_config(config, context, model=model)
    return Unit(key=ollama_key(backend, model), backend=backend.name, config=config, driver=driver,
                memory=model_memory(config, model), slot_group=backend.name, slot_limit=config.max_loaded_models)
