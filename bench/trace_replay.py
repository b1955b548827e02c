"""Trace replay: the real GPU scheduler on simulated backends, Synapse's policy against a naive one.

This is a benchmark, not a test. It builds the real `Scheduler` (with a `LocalCoordinator`) over
simulated lifecycle drivers that take the published wake and sleep latencies and track the device
memory they really hold, then replays one seeded trace of requests through two policies.

The box (the seed deployment): one 32 GiB GPU, 1 GiB reserved, so the budget is 31 GiB.

| unit                 | driver     | resident | asleep  | wake (uniform) | sleep (uniform) |
|----------------------|------------|----------|---------|----------------|-----------------|
| vllm (chat)          | vllm-sleep | 6 GiB    | 1.2 GiB | 0.3-3 s (L1)   | 0.3-0.7 s       |
| speech (TTS/STT)     | process    | 12 GiB   | 0       | 20-40 s (cold) | 0.8-1.5 s       |
| ollama/llama3.1:8b   | ollama     | 9 GiB    | 0       | 3-8 s (load)   | 0.3-0.7 s       |
| ollama/qwen2.5:7b    | ollama     | 8.5 GiB  | 0       | 3-8 s (load)   | 0.3-0.7 s       |

Everything resident at once is 35.5 GiB, so something must give. All units start asleep.

The trace (simulated seconds, seeded RNG):
- chat: bursts start as a Poisson process (mean gap 6 min), last 1-4 min, with Poisson arrivals at
  0.3-1.5 req/s inside a burst; plus a trickle of 1 req/min between bursts;
- speech: sessions as a Poisson process (mean gap 150 s), each 1-4 requests 5-30 s apart;
- ollama: agent-style clusters (mean gap 90 s) of 1-4 requests, 2-10 s apart, for either model (60/40);
- holds: chat lognormal (median 3 s, 0.2-20 s), speech 1-15 s, ollama 1-20 s; 5% of chat and 10% of
  ollama requests are long streams of 20-60 s.
Each request does acquire -> hold -> release. Queue wait is arrival to acquire returning; refused is a
BackendUnavailable (503: max_wait passed, queue full, or a failed wake).

Policies, on the same trace:
- synapse: priorities vllm 10 > speech 5 > ollama 0; idle timeouts none / 15 min / 10 min;
  min_residency 60 s for all; otherwise evict by budget (lowest priority, least recently used first).
- naive: every unit in one `exclusive` group, so any switch evicts whatever else is resident; no idle
  timeouts, no min residency.
Both: max_wait 300 s, starvation_cap 30 s, wake_timeout 1800 s, max_queue 256.

Time scaling: every delay (arrivals, holds, wake/sleep latencies) and every scheduler duration
(max_wait, starvation_cap, idle_timeout, min_residency, wake_timeout) is divided by --scale, and the
scheduler's own poll and idle-sweep intervals too; results are multiplied back into simulated seconds.
Both policies run concurrently in one event loop, so --duration/--scale is the wall time.

Invariants checked from the drivers' own memory accounting: device memory never exceeds the budget
(a wake takes its memory when it starts, a sleep frees it when it ends), and no request ever reaches
a backend that is asleep. The script exits 1 if either is broken.

    .venv/bin/python bench/trace_replay.py --scale 60 --seed 7 --duration 3600
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter

from synapse_gateway.config.schema import GpuConfig, LifecycleConfig
from synapse_gateway.errors import BackendUnavailable
from synapse_gateway.scheduler.coordination import LocalCoordinator
from synapse_gateway.scheduler.metrics import SchedulerMetrics
from synapse_gateway.scheduler.scheduler import Scheduler
from synapse_gateway.scheduler.units import Unit

GiB = 1024**3
DEVICE_MEMORY, RESERVE = 32 * GiB, 1 * GiB
MAX_WAIT, STARVATION_CAP, WAKE_TIMEOUT = 300.0, 30.0, 1800.0


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str  # the workload that uses it: chat, speech, ollama
    driver: str
    memory: float  # GiB
    asleep: float  # GiB
    wake: tuple[float, float]  # seconds, uniform
    sleep: tuple[float, float]
    priority: int
    idle_timeout: float | None


PROFILES = [
    Profile("vllm", "chat", "vllm-sleep", 6.0, 1.2, (0.3, 3.0), (0.3, 0.7), 10, None),
    Profile("speech", "speech", "process", 12.0, 0.0, (20.0, 40.0), (0.8, 1.5), 5, 900.0),
    Profile("ollama/llama3.1:8b", "ollama", "ollama", 9.0, 0.0, (3.0, 8.0), (0.3, 0.7), 0, 600.0),
    Profile("ollama/qwen2.5:7b", "ollama", "ollama", 8.5, 0.0, (3.0, 8.0), (0.3, 0.7), 0, 600.0),
]
MIN_RESIDENCY = 60.0


@dataclass(frozen=True)
class Request:
    at: float  # arrival, simulated seconds
    unit: str
    hold: float


def make_trace(seed: int, duration: float) -> list[Request]:
    rng = random.Random(seed)
    out: list[Request] = []

    def chat_hold() -> float:
        return rng.uniform(20, 60) if rng.random() < 0.05 else min(20.0, max(0.2, rng.lognormvariate(1.1, 0.8)))

    t = rng.expovariate(1 / 360)
    while t < duration:  # chat bursts
        end, rate, a = t + rng.uniform(60, 240), rng.uniform(0.3, 1.5), t
        while a < end:
            out.append(Request(a, "vllm", chat_hold()))
            a += rng.expovariate(rate)
        t = end + rng.expovariate(1 / 360)
    t = rng.expovariate(1 / 60)
    while t < duration:  # chat trickle
        out.append(Request(t, "vllm", chat_hold()))
        t += rng.expovariate(1 / 60)
    t = rng.expovariate(1 / 150)
    while t < duration:  # speech sessions
        a = t
        for _ in range(rng.randint(1, 4)):
            out.append(Request(a, "speech", rng.uniform(1, 15)))
            a += rng.uniform(5, 30)
        t += rng.expovariate(1 / 150)
    t = rng.expovariate(1 / 90)
    while t < duration:  # ollama agent clusters
        model, a = ("ollama/llama3.1:8b" if rng.random() < 0.6 else "ollama/qwen2.5:7b"), t
        for _ in range(rng.randint(1, 4)):
            out.append(Request(a, model, rng.uniform(20, 60) if rng.random() < 0.1 else rng.uniform(1, 20)))
            a += rng.uniform(2, 10)
        t += rng.expovariate(1 / 90)
    return sorted((r for r in out if r.at < duration), key=lambda r: r.at)


@dataclass
class Device:
    """The memory the simulated backends really hold on the GPU."""

    capacity: int
    used: int = 0
    peak: int = 0
    violations: list[str] = field(default_factory=list)

    def take(self, amount: int, why: str) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)
        if self.used > self.capacity:
            self.violations.append(f"{why}: {self.used / GiB:.1f} GiB > {self.capacity / GiB:.1f} GiB")


class SimBackend:
    """A LifecycleDriver with the profile's latencies (divided by `scale`) and memory."""

    def __init__(self, profile: Profile, device: Device, scale: float, rng: random.Random) -> None:
        self.p, self.device, self.scale, self.rng = profile, device, scale, rng
        self.memory, self.asleep = int(profile.memory * GiB), int(profile.asleep * GiB)
        self.resident, self.serving, self.wakes, self.sleeps = False, 0, 0, 0
        device.take(self.asleep, f"{profile.name} starts asleep")

    async def is_resident(self) -> bool:
        return self.resident

    async def wake(self) -> None:
        self.device.take(self.memory - self.asleep, f"waking {self.p.name}")
        await asyncio.sleep(self.rng.uniform(*self.p.wake) / self.scale)
        self.resident, self.wakes = True, self.wakes + 1

    async def sleep(self) -> None:
        if self.serving:
            self.device.violations.append(f"{self.p.name} put to sleep with {self.serving} requests running")
        self.resident = False
        await asyncio.sleep(self.rng.uniform(*self.p.sleep) / self.scale)
        self.device.take(self.asleep - self.memory, f"{self.p.name} asleep")
        self.sleeps += 1

    async def serve(self, hold: float) -> None:
        if not self.resident:
            self.device.violations.append(f"a request reached {self.p.name} while it was asleep")
        self.serving += 1
        try:
            await asyncio.sleep(hold)
        finally:
            self.serving -= 1


def lifecycle(p: Profile, policy: str, scale: float) -> LifecycleConfig:
    cfg: dict[str, object] = {"driver": p.driver, "memory": int(p.memory * GiB),
                              "sleeping_memory": int(p.asleep * GiB), "wake_timeout": WAKE_TIMEOUT / scale}
    if policy.startswith("naive"):
        cfg["exclusive"] = ["gpu"]
    else:
        cfg.update(priority=p.priority, min_residency=MIN_RESIDENCY / scale,
                   idle_timeout=None if p.idle_timeout is None else p.idle_timeout / scale)
    return TypeAdapter(LifecycleConfig).validate_python(cfg)  # one model per driver, picked by `driver`


@dataclass
class Result:
    policy: str
    requests: int
    waits: dict[str, list[float]] = field(default_factory=dict)  # by workload, simulated seconds
    refused: int = 0
    wakes: int = 0
    sleeps: int = 0
    device: Device | None = None


async def replay(policy: str, trace: list[Request], scale: float, seed: int) -> Result:
    device = Device(DEVICE_MEMORY - RESERVE)
    backends = {p.name: SimBackend(p, device, scale, random.Random(f"{seed}/{p.name}")) for p in PROFILES}
    units = {}
    for p in PROFILES:
        slot = "ollama" if p.driver == "ollama" else None
        units[p.name] = Unit(key=p.name, backend=p.name.split("/")[0], config=lifecycle(p, policy, scale),
                             driver=backends[p.name], memory=backends[p.name].memory,
                             sleeping_memory=backends[p.name].asleep, slot_group=slot, slot_limit=2 if slot else 0)
    settings = GpuConfig(memory=DEVICE_MEMORY, reserve=RESERVE, max_wait=MAX_WAIT / scale,
                         starvation_cap=STARVATION_CAP / scale)
    scheduler = Scheduler(settings, units.values(), LocalCoordinator(), SchedulerMetrics(CollectorRegistry()))
    scheduler.poll_interval /= scale  # the scheduler's own clocks, scaled like everything else
    scheduler.sweep_interval /= scale
    await scheduler.start()
    result = Result(policy, len(trace), {p.kind: [] for p in PROFILES}, device=device)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(req: Request) -> None:
        await asyncio.sleep(max(0.0, t0 + req.at / scale - loop.time()))
        arrived, unit = loop.time(), units[req.unit]
        try:
            await scheduler.acquire(unit)
        except BackendUnavailable:
            result.refused += 1
            return
        result.waits[backends[req.unit].p.kind].append((loop.time() - arrived) * scale)
        if scheduler.used(unit.device) > scheduler.capacity(unit.device):
            device.violations.append(f"scheduler counts {scheduler.used(unit.device)} bytes over budget")
        try:
            await backends[req.unit].serve(req.hold / scale)
        finally:
            scheduler.release(unit)

    await asyncio.gather(*(one(r) for r in trace))
    await scheduler.stop()
    result.wakes = sum(b.wakes for b in backends.values())
    result.sleeps = sum(b.sleeps for b in backends.values())
    return result


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def report(results: list[Result], trace: list[Request], args: argparse.Namespace, wall: float) -> None:
    kinds = {p.name: p.kind for p in PROFILES}
    mix = ", ".join(f"{k} {sum(kinds[r.unit] == k for r in trace)}" for k in ("chat", "speech", "ollama"))
    print(f"Trace: seed {args.seed}, {args.duration:g} s simulated ({mix}); scale {args.scale:g}, "
          f"wall {wall:.1f} s. Waits in simulated seconds.\n")
    print("| policy | requests | served | refused | swaps (wakes/sleeps) | wait p50 | wait p95 | wait p99 "
          "| max device memory / budget |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        waits = [w for ws in r.waits.values() for w in ws]
        assert r.device is not None
        print(f"| {r.policy} | {r.requests} | {len(waits)} | {r.refused} | {r.wakes + r.sleeps} ({r.wakes}/{r.sleeps}) "
              f"| {pct(waits, 50):.2f} | {pct(waits, 95):.1f} | {pct(waits, 99):.1f} "
              f"| {r.device.peak / GiB:.1f} / {r.device.capacity / GiB:.1f} GiB |")
    print("\n| policy | chat p50 / p95 | speech p50 / p95 | ollama p50 / p95 |")
    print("|---|---:|---:|---:|")
    for r in results:
        cells = [f"{pct(r.waits[k], 50):.2f} / {pct(r.waits[k], 95):.1f}" for k in ("chat", "speech", "ollama")]
        print(f"| {r.policy} | " + " | ".join(cells) + " |")
    print()
    for r in results:
        assert r.device is not None
        state = "held" if not r.device.violations else f"BROKEN ({len(r.device.violations)}: {r.device.violations[:3]})"
        print(f"{r.policy}: budget invariant {state}; peak {r.device.peak / GiB:.1f} GiB of "
              f"{r.device.capacity / GiB:.1f} GiB budget ({DEVICE_MEMORY / GiB:.0f} GiB device)")


async def main(args: argparse.Namespace) -> int:
    trace = make_trace(args.seed, args.duration)
    started = time.monotonic()
    results = await asyncio.gather(replay("synapse", trace, args.scale, args.seed),
                                   replay("naive (evict on every switch)", trace, args.scale, args.seed))
    report(list(results), trace, args, time.monotonic() - started)
    return 1 if any(r.device and r.device.violations for r in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=60.0, help="simulated seconds per wall second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=float, default=3600.0, help="trace length, simulated seconds")
    logging.basicConfig(level=logging.ERROR)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
