"""Decides which units are resident: wakes what a request needs, evicts idle units to make room.

The invariant, always: on each device, the memory held by its units never exceeds the budget. A unit
counts only its sleeping memory once its sleep is confirmed; waking, going to sleep, or in doubt after
an action failed (UNKNOWN), it counts in full until its driver says it is asleep. Lifecycle actions on
one device are serialized by the coordinator's lease (a lock in one process, a Redis lease across
replicas); nothing waits for room while holding it, and every driver call is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from ..config.schema import DeviceConfig, GpuConfig
from ..errors import BackendUnavailable, BadGateway, Conflict, GatewayError
from . import placement
from .coordination import CoordinationError, Coordinator, Lease, LeaseLost, LocalCoordinator
from .drivers.base import LifecycleError, SleepFailed, WakeFailed
from .metrics import SchedulerMetrics
from .nvml import DeviceMemory
from .units import Residency, Unit, now

log = logging.getLogger("synapse.scheduler")


class QueueFull(BackendUnavailable):
    code = "queue_full"


class NoRoom(WakeFailed):
    """The unit cannot be made to fit: never (always-on units hold the rest), or not within max_wait."""


class Scheduler:
    """Acquire a unit before dispatching to it and release it after; the scheduler does the rest."""

    # How often a blocked wake re-checks for room, how often idle units are swept, and how long one
    # residency question may take; a simulation that runs time faster scales them down.
    poll_interval = 0.25
    sweep_interval = 1.0
    probe_timeout = 10.0

    def __init__(self, settings: GpuConfig, units: Iterable[Unit], coordinator: Coordinator,
                 metrics: SchedulerMetrics) -> None:
        self.settings = settings
        self.devices: dict[str, DeviceConfig] = {d.name: d for d in settings.device_list()}
        self.units: dict[str, Unit] = {}
        self.coordinator = coordinator
        self.metrics = metrics
        self._changed: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self.devices}
        self._idle_task: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._closed = False
        self._doubt_checked: dict[str, float] = {}
        self.shared = not isinstance(coordinator, LocalCoordinator)
        self.device_memory = DeviceMemory(list(self.devices.values()), settings.nvml)
        for unit in units:
            self.add(unit)
        for device in self.devices:
            self._budget(device)

    def add(self, unit: Unit) -> None:
        """Schedule `unit`; one added after start may already hold memory, so it counts in full until asked."""
        if unit.device not in self.devices:
            raise ValueError(f"unit {unit.key} names device {unit.device!r}; devices: {sorted(self.devices)}")
        self.units[unit.key] = unit
        if self._idle_task is not None:
            self._set(unit, Residency.UNKNOWN)

    def used(self, device: str) -> int:
        return sum(u.held() for u in self._on(device))

    def capacity(self, device: str) -> int:
        return self.devices[device].capacity

    async def start(self) -> None:
        """Learn each unit's residency from its backend (all at once, each bounded), and start the sweeper."""
        await asyncio.gather(*(self._probe(unit) for unit in self.units.values()))
        for device in self.devices:
            if self.used(device) > self.capacity(device):
                log.warning("device %s is over its budget at start-up (%d > %d bytes); evicting idle units",
                            device, self.used(device), self.capacity(device))
                try:
                    async with self.coordinator.lease(device) as lease:
                        await self._sync(device)
                        await self._make_room(device, None, lease, drain=False)
                except Exception as exc:  # start-up goes on: the sweeper and later wakes retry
                    _log_failure(f"evicting on device {device} at start-up", exc)
        self._idle_task = asyncio.create_task(self._sweep_idle(), name="synapse-idle-sweeper")

    async def _probe(self, unit: Unit) -> None:
        resident = await self._ask(unit)
        if resident is None:
            log.warning("cannot tell whether %s is resident; counting its memory until it is known", unit.key)
        state = {True: Residency.RESIDENT, False: Residency.ASLEEP, None: Residency.UNKNOWN}[resident]
        unit.resident_since = now()
        unit.touch()
        self._set(unit, state)

    async def stop(self) -> None:
        """Stop sweeping and waking; anyone still waiting is answered 503."""
        self._closed = True
        tasks = [t for u in self.units.values() for t in (u.bringing_in, u.confirming) if t is not None]
        tasks += [self._idle_task] if self._idle_task is not None else []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._reports, return_exceptions=True)
        self.device_memory.close()

    async def close(self) -> None:
        """`stop`, then withdraw from the other replicas and close the coordinator (safe to call twice)."""
        if self._idle_task is None or not self._idle_task.done():
            await self.stop()
        await self.coordinator.close()

    async def acquire(self, unit: Unit) -> None:
        """Return when `unit` is resident with this request counted in flight; 503 when it cannot be."""
        if unit.state is Residency.RESIDENT and not unit.draining and await self._admit(unit):
            return
        if self._closed:
            raise BackendUnavailable(f"{unit.key} cannot be woken: the gateway is shutting down", retry_after=5)
        if len(unit.waiters) >= self.settings.max_queue:
            raise QueueFull(f"{len(unit.waiters)} requests are already waiting for {unit.key}", retry_after=5)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        unit.waiters.append(future)
        self.metrics.queue(unit)
        if unit.bringing_in is None or unit.bringing_in.done():
            unit.bringing_in = asyncio.create_task(self._bring_in(unit), name=f"wake-{unit.key}")
        started = now()
        try:
            async with asyncio.timeout(self.settings.max_wait):
                await asyncio.shield(future)
        except TimeoutError:
            if future.done() and not future.cancelled() and future.exception() is None:
                return  # handed over just as the wait ran out
            raise BackendUnavailable(f"{unit.key} did not become resident within {self.settings.max_wait:g}s",
                                     retry_after=30) from None
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(unit)  # woken for us, but we are gone
            raise
        finally:
            if future in unit.waiters:
                unit.waiters.remove(future)
            self.metrics.queue(unit, waited=now() - started)

    async def _admit(self, unit: Unit) -> bool:
        """The fast path: count the request in flight on a resident unit (checked once across replicas)."""
        unit.in_flight += 1
        unit.touch()
        if not self.shared:
            if unit.in_flight == 1:
                self._report(unit)
            return True
        if unit.confirmed:
            return True
        if unit.confirming is None or unit.confirming.done():
            unit.confirming = asyncio.create_task(self._still_resident_everywhere(unit))
        try:
            confirmed = await asyncio.shield(unit.confirming)
        except CoordinationError as exc:
            self.release(unit)
            raise BackendUnavailable(f"replicas cannot agree on {unit.key} right now ({type(exc).__name__})",
                                     retry_after=5) from exc
        except BaseException:
            self.release(unit)
            raise
        if not confirmed:
            self.release(unit)  # not resident after all: wait for it like everyone else
        return confirmed

    async def _still_resident_everywhere(self, unit: Unit) -> bool:
        """First request on this replica: announce it, then check no other replica began evicting the unit.

        An evicting replica marks the unit sleeping before it reads the in-flight counts, so either it
        sees this replica's count (and keeps the unit), or this replica sees its mark (and waits).
        """
        await self._write_in_flight(unit)
        record = (await self.coordinator.snapshot()).get(unit.key)
        if record is None or record.get("state") == str(Residency.RESIDENT):
            unit.confirmed = unit.in_flight > 0
            return True
        self._set(unit, Residency.UNKNOWN)  # another replica changed it; the slow path syncs under the lease
        return False

    def must_wait(self, unit: Unit) -> bool:
        """Whether `acquire` would have to wait (the unit is not resident, or is draining)."""
        return unit.state is not Residency.RESIDENT or unit.draining

    def release(self, unit: Unit) -> None:
        unit.in_flight -= 1
        unit.touch()
        if unit.in_flight == 0:
            unit.confirmed = False  # idle here: another replica may now evict it
            self._changed[unit.device].set()
            self._report(unit)

    def _report(self, unit: Unit) -> None:
        """Tell other replicas when a unit starts or stops being in use here (they must not evict it)."""
        task = asyncio.create_task(self._write_in_flight(unit))
        self._reports.add(task)
        task.add_done_callback(self._reported)

    def _reported(self, task: asyncio.Task[None]) -> None:
        self._reports.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the heartbeat re-sends; say why
            log.warning("reporting in-flight requests to other replicas failed: %s", task.exception())

    async def _write_in_flight(self, unit: Unit) -> None:
        """Reports are serialized per unit and send the count as it is when written, never a stale one."""
        async with unit.report_lock:
            await self.coordinator.report_in_flight(unit.key, unit.in_flight)

    # -- operator actions ------------------------------------------------------------------
    async def wake(self, unit: Unit) -> None:
        """Admin: make `unit` resident now (no request is counted); the backend's own answer decides."""
        with _admin_errors(unit, "wake"):
            await self._verify(unit)
        await self.acquire(unit)
        self.release(unit)

    async def sleep(self, unit: Unit) -> None:
        """Admin: put `unit` to sleep now, if nothing is in flight on it (409 otherwise)."""
        if not unit.evictable:
            raise Conflict(f"{unit.key} is always on; it is never put to sleep")
        with _admin_errors(unit, "sleep"):
            async with self.coordinator.lease(unit.device) as lease:
                await self._sync(unit.device)
                if await self._ask(unit) is False:
                    self._set(unit, Residency.ASLEEP)
                    await self._publish(unit, lease)
                    return
                if unit.in_flight or unit.waited_for() or await self.coordinator.in_flight_elsewhere(unit.key):
                    raise Conflict(f"{unit.key} has requests in flight; it sleeps once they are done")
                if unit.state is not Residency.RESIDENT:
                    self._set(unit, Residency.UNKNOWN)  # our books said asleep; its backend says otherwise
                if not await self._evict(unit, lease, reason="asked to"):
                    raise Conflict(f"{unit.key} is in use on another replica")

    async def _verify(self, unit: Unit) -> None:
        """Under the lease: adopt the shared table, then correct it with what the backend itself says."""
        async with self.coordinator.lease(unit.device) as lease:
            await self._sync(unit.device)
            resident = await self._ask(unit)
            if resident is False and unit.state is not Residency.ASLEEP:
                self._set(unit, Residency.ASLEEP)
            elif resident is True and unit.state is Residency.ASLEEP:
                self._set(unit, Residency.UNKNOWN)  # holding memory; a wake verifies it serves
            else:
                return
            await self._publish(unit, lease)

    # -- bringing a unit in ----------------------------------------------------------------
    async def _bring_in(self, unit: Unit) -> None:
        """Make room and wake `unit` for its waiters, until none remains or max_wait has passed.

        The lease is held only while acting: between tries it is free, so sweeps, operator actions
        and other replicas go on. Whatever ends this task, no waiter is left behind.
        """
        started = now()
        failure: BaseException | None = None
        drained: set[Unit] = set()
        try:
            while unit.waited_for():
                changed = self._changed[unit.device]
                changed.clear()
                try:
                    if await self._try_bring_in(unit, drained, drain=now() - started > self.settings.starvation_cap):
                        return
                except LeaseLost as exc:  # another replica may have acted: take the lease again, look afresh
                    log.warning("lost the lease on device %s while bringing in %s: %s", unit.device, unit.key, exc)
                if now() - started >= self.settings.max_wait:
                    raise NoRoom(f"no room for {unit.key} on device {unit.device} within "
                                 f"{self.settings.max_wait:g}s: the units there stayed busy")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await changed.wait()
        except Exception as exc:
            failure = exc
            _log_failure(f"bringing in {unit.key}", exc)
        finally:
            if unit.state is Residency.RESIDENT and not unit.draining:
                self._dispatch(unit)  # also anyone who came while this task was finishing
            else:
                self._fail_waiters(unit, failure)
            self._undrain(drained)

    async def _try_bring_in(self, unit: Unit, drained: set[Unit], *, drain: bool) -> bool:
        """One try under the lease; False when it must wait for room (or for its own drain to end)."""
        async with self.coordinator.lease(unit.device) as lease:
            await self._sync(unit.device)
            if unit.state is Residency.RESIDENT:
                if unit.draining:
                    return False
            else:
                if not await self._make_room(unit.device, unit, lease, drain=drain, drained=drained):
                    return False
                await self._wake(unit, lease)
            # Hand it over and announce the count before the lease goes, or another replica
            # could take the lease and evict the unit under the requests just dispatched.
            self._dispatch(unit)
            if self.shared:
                await self._write_in_flight(unit)
                unit.confirmed = unit.in_flight > 0
            return True

    def _dispatch(self, unit: Unit) -> None:
        """Hand the unit to everyone waiting: counted in flight before they run, so it can't be evicted."""
        before = unit.in_flight
        while unit.waiters:
            future = unit.waiters.popleft()
            if not future.done():
                unit.in_flight += 1
                future.set_result(None)
        unit.touch()
        if before == 0 and unit.in_flight:
            self._report(unit)

    def _fail_waiters(self, unit: Unit, cause: BaseException | None) -> None:
        """Answer every waiter 503; what went wrong inside is in the log, not in the client's answer."""
        while unit.waiters:
            future = unit.waiters.popleft()
            if not future.done():
                future.set_exception(_refusal(unit, cause))

    def _undrain(self, drained: set[Unit]) -> None:
        for other in drained:
            if other.draining and other.state is Residency.RESIDENT:
                other.draining = False
                self._dispatch(other)

    async def _sync(self, device: str) -> None:
        """Adopt the states other replicas published: under the lease, the shared table is the truth.

        A record left waking or sleeping means its writer stopped mid-action: in doubt, counted in full.
        """
        table = await self.coordinator.snapshot()
        for unit in self._on(device):
            record = table.get(unit.key)
            if record is None:
                continue
            state = placement.adopted(record.get("state"))
            if state is not unit.state:
                if state is Residency.RESIDENT:
                    unit.resident_since = now()
                self._set(unit, state)

    async def _wake(self, unit: Unit, lease: Lease) -> None:
        lease.check()
        if unit.memory > self.capacity(unit.device):
            raise NoRoom(f"{unit.key} needs {unit.memory} bytes; device {unit.device} has "
                         f"{self.capacity(unit.device)}")
        await self._await_real_memory(unit)
        before = unit.state
        self._set(unit, Residency.WAKING)
        try:
            await self._publish(unit, lease)
        except BaseException:
            self._set(unit, before)  # nothing was asked of the backend yet
            raise
        started = now()
        try:
            await self._act(unit, unit.driver.wake, lease, "wake")
        except LeaseLost:
            self._set(unit, Residency.UNKNOWN)  # the next holder finds "waking" and verifies it
            raise
        except LifecycleError as exc:
            await self._settle(unit, lease)
            raise WakeFailed(f"waking {unit.key} failed: {exc}") from exc
        unit.resident_since = now()
        self._set(unit, Residency.RESIDENT)
        try:
            await self._publish(unit, lease)
        except CoordinationError:
            self._set(unit, Residency.UNKNOWN)  # awake, but the others don't know: wake (a no-op) again
            raise
        self.metrics.swap(unit, "wake", now() - started)
        log.info("%s is resident (woke in %.2fs; device %s uses %d of %d bytes)", unit.key,
                 now() - started, unit.device, self.used(unit.device), self.capacity(unit.device))

    async def _await_real_memory(self, unit: Unit, patience: float = 10.0) -> None:
        """Where NVML reads the device, refuse a wake that would not fit the memory really free there.

        A process that just slept may take a moment to hand its memory back, hence the patience.
        """
        needed = unit.memory - unit.held()
        deadline = now() + patience
        while (free := self.device_memory.free(unit.device)) is not None and free < needed:
            if now() > deadline:
                raise NoRoom(f"device {unit.device} has {free / 2**30:.1f} GiB really free; {unit.key} "
                                 f"needs {needed / 2**30:.1f} GiB more (something outside Synapse uses the GPU?)")
            await asyncio.sleep(self.poll_interval)

    async def _evict(self, victim: Unit, lease: Lease, *, reason: str) -> bool:
        """Put `victim` to sleep; False when another replica turned out to be using it (it stays)."""
        lease.check()
        before = victim.state
        if victim.in_flight or before not in (Residency.RESIDENT, Residency.UNKNOWN):
            return False  # a request got in while we looked
        self._set(victim, Residency.SLEEPING)  # new requests here queue from now on
        victim.confirmed = False
        try:
            await self._publish(victim, lease)
            busy = await self.coordinator.in_flight_elsewhere(victim.key)
        except BaseException:
            self._set(victim, before)
            raise
        if busy:
            self._set(victim, before)
            await self._publish(victim, lease)
            return False
        started = now()
        try:
            await self._act(victim, victim.driver.sleep, lease, "sleep")
        except LeaseLost:
            self._set(victim, Residency.UNKNOWN)
            raise
        except LifecycleError as exc:
            await self._settle(victim, lease)
            if victim.state is not Residency.ASLEEP:
                raise SleepFailed(f"putting {victim.key} to sleep failed: {exc}") from exc
            log.warning("putting %s to sleep reported an error, but it is asleep: %s", victim.key, exc)
        victim.draining = False
        self._set(victim, Residency.ASLEEP)
        await self._publish(victim, lease)
        self.metrics.swap(victim, "sleep", now() - started)
        log.info("%s is asleep (%s, in %.2fs)", victim.key, reason, now() - started)
        if victim.waiters and (victim.bringing_in is None or victim.bringing_in.done()):
            victim.bringing_in = asyncio.create_task(self._bring_in(victim), name=f"wake-{victim.key}")
        return True

    async def _make_room(self, device: str, unit: Unit | None, lease: Lease, *, drain: bool,
                         drained: set[Unit] | None = None) -> bool:
        """Evict idle units (lowest priority, least recently used first) until `unit` fits.

        False when the rest are busy or not settled: the caller waits and tries again. With `drain`,
        the busy units in the way stop admitting, so they empty and can go (against starvation).
        """
        while True:
            others = [u for u in self._on(device) if u is not unit]
            capacity = self.capacity(device)
            if unit is not None and (reason := placement.impossible(others, capacity, unit)):
                raise NoRoom(reason)
            conflicts = placement.conflicts(others, unit)
            over = placement.overflow(others, capacity, unit)
            if not conflicts and over <= 0:
                return True
            wanted = conflicts or placement.candidates(others)
            if await self._evict_one(placement.eligible(wanted, now()), lease, unit):
                continue
            if drain and drained is not None:
                busy = wanted if conflicts else placement.to_drain(wanted, over)
                for other in busy:
                    if other.state is Residency.RESIDENT and not other.draining:
                        other.draining = True  # stop admitting to it, so it drains and can be evicted
                        drained.add(other)
            return False

    async def _evict_one(self, victims: list[Unit], lease: Lease, unit: Unit | None) -> bool:
        """Evict the first victim that will go; one whose sleep fails stays counted in full."""
        for victim in victims:
            if await self.coordinator.in_flight_elsewhere(victim.key):
                continue
            try:
                if await self._evict(victim, lease, reason=f"room for {unit.key}" if unit else "over budget"):
                    return True
            except LifecycleError as exc:
                log.error("%s", exc)
        return False

    async def _act(self, unit: Unit, action: Callable[[], Awaitable[None]], lease: Lease, what: str) -> None:
        """One driver call, bounded by wake_timeout and abandoned if the lease is lost meanwhile.

        Every failure becomes a LifecycleError (LeaseLost aside): the edge where a driver's foreign
        errors stop, whatever it lets through.
        """
        call = asyncio.ensure_future(action())
        lost = asyncio.create_task(lease.lost.wait())
        try:
            async with asyncio.timeout(unit.config.wake_timeout):
                await asyncio.wait({call, lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise LifecycleError(f"{what} of {unit.key} timed out after {unit.config.wake_timeout:g}s") from None
        finally:
            for task in (call, lost):
                task.cancel()
            await asyncio.gather(call, lost, return_exceptions=True)
        if not call.done() or call.cancelled():
            raise LeaseLost(f"lease on device {unit.device} lost during the {what} of {unit.key}")
        if (exc := call.exception()) is not None:
            if not isinstance(exc, LifecycleError):
                log.error("the %s driver of %s raised %s", what, unit.key, type(exc).__name__, exc_info=exc)
                raise LifecycleError(f"{what} of {unit.key} failed: {type(exc).__name__}: {exc}") from exc
            raise exc

    async def _ask(self, unit: Unit) -> bool | None:
        """The backend's own answer (bounded): resident or not, or None when it cannot say."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                return bool(await unit.driver.is_resident())
        except Exception as exc:
            _log_failure(f"asking whether {unit.key} is resident", exc, level=logging.WARNING)
            return None

    async def _settle(self, unit: Unit, lease: Lease) -> None:
        """After a failed action: asleep only if the backend says so; otherwise in doubt, counted in full."""
        resident = await self._ask(unit)
        self._set(unit, Residency.ASLEEP if resident is False else Residency.UNKNOWN)
        with contextlib.suppress(CoordinationError):  # unpublished, the others still see it waking or sleeping
            await self._publish(unit, lease)

    def _set(self, unit: Unit, state: Residency) -> None:
        unit.state = state
        self.metrics.state(unit)
        self._budget(unit.device)
        if state is Residency.ASLEEP:
            self._changed[unit.device].set()

    def _budget(self, device: str) -> None:
        self.metrics.budget(device, self.used(device), self.capacity(device))

    def _on(self, device: str) -> list[Unit]:
        return [u for u in self.units.values() if u.device == device]

    async def _publish(self, unit: Unit, lease: Lease) -> None:
        await self.coordinator.publish(unit.key, {"state": str(unit.state), "memory": unit.held(),
                                                  "since": now()}, lease.token)

    # -- the idle sweeper ------------------------------------------------------------------
    async def _sweep_idle(self) -> None:
        """Put units to sleep once idle for their idle_timeout; settle units in doubt. It never dies."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self._sweep_once()
            except Exception as exc:
                _log_failure("the idle sweep", exc)

    async def _sweep_once(self) -> None:
        for device in self.devices:
            used = self.device_memory.used(device)
            if used is not None:
                self.metrics.device_bytes.labels(device).set(used)
        for unit in list(self.units.values()):
            at = now()
            doubt = placement.in_doubt(unit) and at >= self._doubt_checked.get(unit.key, 0.0)
            if not (doubt or placement.idle(unit, at)):
                continue
            if doubt:  # a backend that cannot answer is asked again only every few sweeps
                self._doubt_checked[unit.key] = at + 10 * self.sweep_interval
            try:
                async with self.coordinator.lease(unit.device) as lease:
                    await self._sync(unit.device)
                    if doubt and placement.in_doubt(unit) and await self._ask(unit) is False:
                        self._set(unit, Residency.ASLEEP)
                        await self._publish(unit, lease)
                    elif placement.idle(unit, now()):
                        await self._evict(unit, lease, reason=f"idle for {unit.config.idle_timeout:g}s")
            except Exception as exc:
                _log_failure(f"idle sleep of {unit.key}", exc, level=logging.WARNING)

    def status(self) -> list[dict[str, Any]]:
        at = now()
        return [{"unit": u.key, "backend": u.backend, "device": u.device, "driver": u.config.driver,
                 "state": str(u.state), "memory_held": u.held(), "memory_resident": u.memory,
                 "idle_s": round(u.idle_for(at), 1), "in_flight": u.in_flight, "queue": len(u.waiters),
                 "priority": u.config.priority}
                for u in self.units.values()]


def _refusal(unit: Unit, cause: BaseException | None) -> GatewayError:
    if isinstance(cause, GatewayError):
        return cause
    if isinstance(cause, NoRoom):
        return BackendUnavailable(str(cause), retry_after=30)
    if isinstance(cause, CoordinationError):
        return BackendUnavailable(f"replicas could not agree on device {unit.device}; retry", retry_after=5)
    return BackendUnavailable(f"{unit.key} could not be made resident (the gateway log says why)", retry_after=10)


def _log_failure(what: str, exc: BaseException, *, level: int = logging.ERROR) -> None:
    """Our own failures are logged plainly; anything else is a bug, logged with its traceback."""
    if isinstance(exc, LifecycleError | CoordinationError | TimeoutError | OSError | GatewayError):
        log.log(level, "%s failed: %s", what, exc or type(exc).__name__)
    else:
        log.error("%s failed unexpectedly", what, exc_info=exc)


@contextlib.contextmanager
def _admin_errors(unit: Unit, action: str) -> Iterator[None]:
    """An operator's action answers one of the gateway's errors, never a bare 500."""
    try:
        yield
    except LifecycleError as exc:
        log.error("%s of %s failed: %s", action, unit.key, exc)
        raise BadGateway(f"the {action} of {unit.key} failed (the gateway log says why)") from exc
    except CoordinationError as exc:
        log.error("%s of %s failed: %s", action, unit.key, exc)
        raise BackendUnavailable(f"replicas could not agree on device {unit.device}; retry", retry_after=5) from exc
