"""The scheduler's Prometheus metrics: unit states, swaps, queue, budget and real device memory."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .units import Residency, Unit

_SWAP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800)


class SchedulerMetrics:
    """Registered on the gateway's own registry, so /metrics shows them with the rest."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.unit_state = Gauge("synapse_gpu_unit_state", "1 for the state each unit is in.",
                                ["unit", "state"], registry=registry)
        self.budget_bytes = Gauge("synapse_gpu_budget_bytes", "Memory the scheduler may use on a device.",
                                  ["device"], registry=registry)
        self.used_bytes = Gauge("synapse_gpu_budget_used_bytes", "Memory held by units, as the scheduler counts.",
                                ["device"], registry=registry)
        self.device_bytes = Gauge("synapse_gpu_device_memory_used_bytes", "Device memory in use, read from NVML.",
                                  ["device"], registry=registry)
        self.swaps = Counter("synapse_gpu_swaps", "Wakes and sleeps, by unit.", ["unit", "action"],
                             registry=registry)
        self.swap_seconds = Histogram("synapse_gpu_swap_duration_seconds", "How long wakes and sleeps take.",
                                      ["action"], buckets=_SWAP_BUCKETS, registry=registry)
        self.queue_depth = Gauge("synapse_gpu_queue_depth", "Requests waiting for a unit to wake.", ["unit"],
                                 registry=registry)
        self.queue_wait = Histogram("synapse_gpu_queue_wait_seconds", "How long requests waited for a wake.",
                                    buckets=_SWAP_BUCKETS, registry=registry)
        self.fallbacks = Counter("synapse_gpu_wake_fallbacks", "Wakes that failed and fell back to a restart.",
                                 ["unit"], registry=registry)

    def state(self, unit: Unit) -> None:
        for state in Residency:
            self.unit_state.labels(unit.key, str(state)).set(1 if unit.state is state else 0)

    def budget(self, device: str, used: int, capacity: int) -> None:
        self.used_bytes.labels(device).set(used)
        self.budget_bytes.labels(device).set(capacity)

    def swap(self, unit: Unit, action: str, seconds: float) -> None:
        self.swaps.labels(unit.key, action).inc()
        self.swap_seconds.labels(action).observe(seconds)

    def queue(self, unit: Unit, waited: float | None = None) -> None:
        self.queue_depth.labels(unit.key).set(len(unit.waiters))
        if waited is not None:
            self.queue_wait.observe(waited)
