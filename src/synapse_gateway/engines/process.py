"""A managed engine: a child process Synapse starts, health-checks, restarts with backoff and stops."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import aiohttp

from ..config.schema import ManagedConfig

_PR_SET_PDEATHSIG = 1
_HEALTH_POLL = 0.2
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


class EngineFailed(Exception):
    """The engine could not be started (it exited, or never became healthy in time)."""


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

    def __init__(self, name: str, config: ManagedConfig, health_url: str, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.config = config
        self.health_url = health_url
        self.session = session
        self.state = EngineState.STOPPED
        self.ready = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.last_error: str | None = None
        self.output: deque[str] = deque(maxlen=30)
        self._log = logging.getLogger(f"synapse.engine.{name}")
        self._supervisor: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self.on_ready: Callable[[], Awaitable[None]] | None = None
        self._pump_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start supervising; returns once the first start has succeeded or failed (never raises)."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"engine-{self.name}")
        await self._settled.wait()

    async def settled(self) -> None:
        """Wait until the first start has succeeded or failed."""
        await self._settled.wait()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the engine answers its health check; EngineFailed if it cannot within `timeout`."""
        if self.ready.is_set():
            return
        if self.state in (EngineState.FAILED, EngineState.STOPPED, EngineState.STOPPING):
            raise EngineFailed(self._why())
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError as exc:
            raise EngineFailed(f"engine {self.name} is not ready after {timeout:g}s ({self.state})") from exc

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
        await self._terminate()
        self.state = EngineState.STOPPED
        self._supervisor, self._settled = None, asyncio.Event()  # a later start() starts afresh

    def status(self) -> dict[str, Any]:
        """State, PID, uptime, restarts and memory, for `synapse engines` and the admin API."""
        pid = self.process.pid if self.process and self.process.returncode is None else None
        uptime = time.monotonic() - self.started_at if pid and self.started_at else None
        return {"name": self.name, "state": str(self.state), "pid": pid,
                "uptime_s": None if uptime is None else round(uptime, 1), "restarts": self.restarts,
                "rss_bytes": _rss(pid) if pid else None, "last_error": self.last_error,
                "command": self.config.command}

    async def _supervise(self) -> None:
        delay = self.config.backoff_initial
        while True:
            started = time.monotonic()
            try:
                await self._run_once()
            except EngineFailed as exc:
                self.last_error = str(exc)
                self._log.error("%s", exc)
            finally:
                self.ready.clear()
                self._settled.set()
            if not self._should_restart():
                self.state = EngineState.FAILED
                return
            if time.monotonic() - started > 60:  # it ran for a while: start the backoff over
                delay = self.config.backoff_initial
            self.state = EngineState.BACKOFF
            self._log.warning("restarting engine %s in %gs", self.name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.backoff_max)
            self.restarts += 1

    def _should_restart(self) -> bool:
        policy = self.config.restart
        if policy == "never":
            return False
        code = self.process.returncode if self.process else None
        return policy == "always" or code != 0

    async def _run_once(self) -> None:
        """Spawn, wait for health, then wait for the process to exit."""
        self.state = EngineState.STARTING
        process = await self._spawn()
        exited = asyncio.ensure_future(process.wait())
        try:
            await self._wait_healthy(exited)
            self.state, self.last_error = EngineState.READY, None
            self.ready.set()
            self._log.info("engine %s is ready (pid %d, %.1fs)", self.name, process.pid,
                           time.monotonic() - (self.started_at or 0))
            if self.on_ready is not None:
                await self.on_ready()
            self._settled.set()
            code = await exited
            raise EngineFailed(f"engine {self.name} exited with status {code}; last output: {self._tail()}")
        finally:
            if not exited.done():
                await self._terminate()
            exited.cancel()

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.config.env}
        self._log.info("starting engine %s: %s", self.name, " ".join(self.config.command))
        parent = os.getpid()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.config.command, env=env, cwd=self.config.cwd, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent))
        except OSError as exc:
            raise EngineFailed(f"engine {self.name} cannot start `{self.config.command[0]}`: {exc.strerror}") from exc
        self.started_at = time.monotonic()
        self._pump_task = asyncio.create_task(self._pump(self.process), name=f"engine-{self.name}-output")
        return self.process

    async def _wait_healthy(self, exited: asyncio.Future[int]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            if exited.done():
                raise EngineFailed(f"engine {self.name} exited with status {exited.result()} while starting; "
                                   f"last output: {self._tail()}")
            if await self._healthy():
                return
            await asyncio.wait([exited], timeout=_HEALTH_POLL)
        raise EngineFailed(f"engine {self.name} did not answer {self.health_url} within "
                           f"{self.config.startup_timeout:g}s (startup_timeout); last output: {self._tail()}")

    async def _healthy(self) -> bool:
        try:
            async with self.session.get(self.health_url, timeout=_PROBE_TIMEOUT) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        """Log each line the engine prints, prefixed by its logger name, and keep the last few."""
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.output.append(line)
                self._log.info("%s", line)

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.config.stop_grace)
        except TimeoutError:
            self._log.warning("engine %s ignored SIGTERM for %gs; killing it", self.name, self.config.stop_grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    def _tail(self) -> str:
        return " | ".join(list(self.output)[-5:]) or "(nothing)"

    def _why(self) -> str:
        return self.last_error or f"engine {self.name} is {self.state}"


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
