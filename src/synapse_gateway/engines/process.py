"""A managed engine: a child process Synapse starts, health-checks, restarts with backoff and stops."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp

from ..config.schema import ManagedConfig
from .group import GroupGuard, end_group, signal_group
from .output import CHUNK, drain
from .redact import Redactor

_PR_SET_PDEATHSIG = 1
_HEALTH_POLL = 0.2
_STARTUP_PROBE_TIMEOUT = 2.0
_TAIL_LINES, _TAIL_CHARS = 5, 300
_RAN_A_WHILE = 60.0  # an engine that served this long starts its restart backoff over


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


class EngineFailed(Exception):
    """The engine cannot serve: it exited, never became healthy in time, or stopped answering.

    `str(exc)` is safe to show API clients (no output lines, URLs or arguments); `detail` says more, with
    secrets masked, for the log and /admin/engines.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message


@dataclass(frozen=True, slots=True)
class Liveness:
    """How a ready engine is watched: a health probe every `interval`; `failures` misses in a row restart it."""

    interval: float = 10.0
    timeout: float = 10.0
    failures: int = 3


def _die_with_parent(parent: int) -> None:
    """Runs in the child before exec: be killed when Synapse dies, even by SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the clean-stop path still applies
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class ManagedEngine:
    """Runs one engine command; `ready` is set while it answers its health check."""

    def __init__(self, name: str, config: ManagedConfig, health_url: str, session: aiohttp.ClientSession, *,
                 on_ready: Callable[[], Awaitable[None]] | None = None, liveness: Liveness = Liveness()) -> None:
        self.name = name
        self.config = config
        self.health_url = health_url
        self.session = session
        self.on_ready = on_ready
        self.liveness = liveness
        self.state = EngineState.STOPPED
        self.ready = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.last_error: str | None = None  # for operators: detail with secrets masked
        self.output: deque[str] = deque(maxlen=30)
        self.redactor = Redactor(config.command, config.env)
        self._failure: str | None = None  # the same failure, as clients may read it
        self._log = logging.getLogger(f"synapse.engine.{name}")
        self._supervisor: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._failed = asyncio.Event()  # set with state FAILED: waiters stop waiting for `ready`
        self._lines = 0  # output lines so far: an engine that prints is not hung

    async def start(self) -> None:
        """Start supervising; returns once the first start has succeeded or failed (never raises)."""
        if self._supervisor is None:
            self._failed.clear()
            self._supervisor = asyncio.create_task(self._supervise(), name=f"engine-{self.name}")
        await self._settled.wait()

    async def settled(self) -> None:
        """Wait until the first start has succeeded or failed."""
        await self._settled.wait()

    @property
    def is_settled(self) -> bool:
        """Whether the first start has succeeded or failed (for a readiness check that must not wait)."""
        return self._settled.is_set()

    @property
    def failure(self) -> str | None:
        """Why the engine last failed, in words safe for anyone (no output, URL or arguments); None if serving.

        `last_error` says more, for operators (/admin/engines and the log).
        """
        return self._failure

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the engine answers its health check; EngineFailed if it cannot within `timeout`.

        An engine that gives up while we wait (restart policy spent) fails the wait at once, with its reason.
        """
        if self.ready.is_set():
            return
        if self.state in (EngineState.FAILED, EngineState.STOPPED, EngineState.STOPPING):
            raise self._why()
        waits = [asyncio.ensure_future(self.ready.wait()), asyncio.ensure_future(self._failed.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.ready.is_set():
            return
        if self._failed.is_set():
            raise self._why()
        raise EngineFailed(f"engine {self.name} is not ready after {timeout:g}s ({self.state})",
                           f"engine {self.name} is not ready after {timeout:g}s ({self.state}); "
                           f"last error: {self.last_error or 'none'}")

    def notice_refused(self) -> None:
        """A connection was refused: if the process has died, stop routing to it until it is restarted."""
        process = self.process
        if process is None or process.returncode is not None or not _running(process.pid):
            self.ready.clear()

    async def stop(self) -> None:
        """SIGTERM the engine's process group, SIGKILL after the grace time, and stop supervising."""
        self.state = EngineState.STOPPING
        self.ready.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self.process is not None and self.process.returncode is None:  # stopped before it was watched
            await self._terminate(self.process)
        self.state = EngineState.STOPPED
        self._supervisor, self._settled = None, asyncio.Event()  # a later start() starts afresh

    def status(self) -> dict[str, Any]:
        """State, PID, uptime, restarts and memory, for `synapse engines` and the admin API (secrets masked)."""
        pid = self.process.pid if self.process and self.process.returncode is None else None
        uptime = time.monotonic() - self.started_at if pid and self.started_at else None
        return {"name": self.name, "state": str(self.state), "pid": pid,
                "uptime_s": None if uptime is None else round(uptime, 1), "restarts": self.restarts,
                "rss_bytes": _rss(pid) if pid else None, "last_error": self.last_error,
                "command": self.redactor.command}

    async def _supervise(self) -> None:
        try:
            await self._restart_loop()
        except Exception as exc:  # a bug here must not leave the engine looking ready, nor pass unseen
            self._log.exception("engine %s: its supervisor failed", self.name)
            self._record(EngineFailed(f"engine {self.name} failed", f"the supervisor failed: {exc!r}"))
            self._give_up()
            if self.process is not None and self.process.returncode is None:
                await self._terminate(self.process)

    async def _restart_loop(self) -> None:
        delay = self.config.backoff_initial
        while True:
            started = time.monotonic()
            try:
                await self._run_once()
            except EngineFailed:
                pass  # recorded by _run_once, and restarted below unless the policy says not to
            finally:
                self.ready.clear()
                self._settled.set()
            if not self._should_restart():
                self._give_up()
                return
            if time.monotonic() - started > _RAN_A_WHILE:
                delay = self.config.backoff_initial
            self.state = EngineState.BACKOFF
            self._log.warning("restarting engine %s in %gs", self.name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.backoff_max)
            self.restarts += 1

    def _give_up(self) -> None:
        self.state = EngineState.FAILED
        self.ready.clear()
        self._settled.set()
        self._failed.set()

    def _record(self, exc: EngineFailed) -> None:
        self._failure, self.last_error = str(exc), self.redactor.text(exc.detail)
        self._log.error("%s", self.last_error)

    def _should_restart(self) -> bool:
        policy = self.config.restart
        if policy == "never":
            return False
        code = self.process.returncode if self.process else None
        return policy == "always" or code != 0

    async def _run_once(self) -> None:
        """Spawn, wait for health, then watch it until it exits or stops answering."""
        self.state = EngineState.STARTING
        try:
            process, output, pipe = await self._spawn()
        except EngineFailed as exc:
            self._record(exc)
            raise
        exited = asyncio.ensure_future(process.wait())
        pump = asyncio.create_task(self._pump(process, output), name=f"engine-{self.name}-output")
        guard: GroupGuard | None = None
        try:
            guard = await self._guard(process.pid)
            await self._wait_healthy(exited)
            self.state, self.last_error, self._failure = EngineState.READY, None, None
            self.ready.set()
            self._log.info("engine %s is ready (pid %d, %.1fs)", self.name, process.pid,
                           time.monotonic() - (self.started_at or 0))
            await self._notify_ready()
            self._settled.set()
            await self._watch(exited)
        except EngineFailed as exc:
            self.state = EngineState.BACKOFF  # not serving, not given up on: requests keep waiting
            self._record(exc)  # at once: /admin/engines says why while the group is being ended
            raise
        finally:
            self.ready.clear()
            await self._terminate(process)
            exited.cancel()
            if guard is not None:
                await guard.disarm()
            await _finish(pump)
            pipe.close()

    async def _spawn(self) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader, asyncio.BaseTransport]:
        """Start the command in its own session; its output goes to a pipe that outlives only its group."""
        env = {**os.environ, **self.config.env}
        self._log.info("starting engine %s: %s", self.name, shlex.join(self.redactor.command))
        parent = os.getpid()
        # Our own pipe rather than asyncio's: process.wait() then reports the engine's exit even while
        # orphaned workers still hold its output open (asyncio waits for every pipe to close).
        read_fd, write_fd = os.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.config.command, env=env, cwd=self.config.cwd, stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent))
        except OSError as exc:
            os.close(read_fd)
            raise EngineFailed(f"engine {self.name} could not be started",
                               f"engine {self.name} cannot start `{self.redactor.command[0]}`: "
                               f"{exc.strerror}") from exc
        finally:
            os.close(write_fd)
        self.started_at = time.monotonic()
        reader = asyncio.StreamReader(limit=2 * CHUNK)
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0))
        return self.process, reader, pipe

    async def _guard(self, pgid: int) -> GroupGuard | None:
        try:
            return await GroupGuard.start(pgid)
        except OSError as exc:
            self._log.warning("engine %s: no guard for its workers (%s); they may outlive a killed gateway",
                              self.name, exc)
            return None

    async def _wait_healthy(self, exited: asyncio.Future[int]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            if exited.done():
                raise EngineFailed(f"engine {self.name} exited with status {exited.result()} while starting",
                                   f"engine {self.name} exited with status {exited.result()} while starting; "
                                   f"last output: {self._tail()}")
            if await self._healthy(_STARTUP_PROBE_TIMEOUT):
                return
            await asyncio.wait([exited], timeout=_HEALTH_POLL)
        timeout = f"{self.config.startup_timeout:g}s (startup_timeout)"
        raise EngineFailed(f"engine {self.name} did not become ready within {timeout}",
                           f"engine {self.name} did not answer {self.health_url} within {timeout}; "
                           f"last output: {self._tail()}")

    async def _notify_ready(self) -> None:
        """Run `on_ready` (discovery); its failure is logged and never stops a healthy engine."""
        if self.on_ready is None:
            return
        try:
            await self.on_ready()
        except Exception:
            self._log.exception("engine %s is ready, but what runs on ready failed; it keeps serving", self.name)

    async def _watch(self, exited: asyncio.Future[int]) -> None:
        """Probe the health of a ready engine until it exits; raise when it stops answering.

        A probe that fails while the engine keeps printing is not counted: an engine whose HTTP threads
        are all held by long streams (llama-server has `--parallel` + 2) answers /health late but is not
        hung, and restarting it would drop every request it serves.
        """
        misses = 0
        while True:
            await asyncio.wait([exited], timeout=self.liveness.interval)
            if exited.done():
                raise EngineFailed(f"engine {self.name} exited with status {exited.result()}",
                                   f"engine {self.name} exited with status {exited.result()}; "
                                   f"last output: {self._tail()}")
            printed = self._lines
            if await self._healthy(self.liveness.timeout):
                misses = 0
                continue
            if self._lines != printed:
                self._log.warning("engine %s did not answer its health check, but it is working", self.name)
                continue
            misses += 1
            self._log.warning("engine %s did not answer its health check (%d of %d)", self.name, misses,
                              self.liveness.failures)
            if misses >= self.liveness.failures:
                self.ready.clear()
                raise EngineFailed(f"engine {self.name} stopped answering its health check",
                                   f"engine {self.name} did not answer {self.health_url} {misses} times in a "
                                   f"row and printed nothing; restarting it; last output: {self._tail()}")

    async def _healthy(self, timeout: float) -> bool:
        try:
            async with self.session.get(self.health_url, timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
                await answer.read()
                return answer.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _pump(self, process: asyncio.subprocess.Process, output: asyncio.StreamReader) -> None:
        """Log each line the engine prints and keep the last few; if its pipe breaks, stop the engine."""
        try:
            await drain(output, self._on_line, self._log)
        except Exception:
            # Nothing reads the pipe any more, so the engine would soon block in write(): end it now, and
            # the supervisor starts a fresh one.
            self._log.exception("engine %s: its output could not be read; stopping it", self.name)
            if process.returncode is None:
                signal_group(process.pid, signal.SIGKILL)

    def _on_line(self, line: str) -> None:
        self._lines += 1
        line = self.redactor.text(line)
        self.output.append(line)
        self._log.info("%s", line)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """End the engine's whole group: its workers too, even when the engine itself has exited."""
        grace = self.config.stop_grace
        if process.returncode is None:
            signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                self._log.warning("engine %s ignored SIGTERM for %gs; killing it", self.name, grace)
                signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        if not await end_group(process.pid, grace):
            self._log.warning("engine %s: processes of its group %d survived SIGKILL", self.name, process.pid)

    def _why(self) -> EngineFailed:
        fallback = f"engine {self.name} is {self.state}"
        return EngineFailed(self._failure or fallback, self.last_error or fallback)

    def _tail(self) -> str:
        lines = list(self.output)[-_TAIL_LINES:]
        return " | ".join(line if len(line) <= _TAIL_CHARS else line[:_TAIL_CHARS] + "..." for line in lines) \
            or "(nothing)"


async def _finish(pump: asyncio.Task[None]) -> None:
    """Let the reader take the group's last words, but never wait long for a pipe someone still holds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(pump), 1.0)
    if not pump.done():
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


def _running(pid: int) -> bool:
    """True unless the process is gone or a zombie its supervisor has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return not os.path.isdir("/proc")  # no procfs: assume it runs


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
