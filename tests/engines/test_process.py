"""ManagedEngine against real child processes: floods of output, hangs, failing hooks, secrets, workers."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from synapse_gateway.config.schema import ManagedConfig
from synapse_gateway.engines.process import EngineFailed, EngineState, Liveness, ManagedEngine
from synapse_gateway.web.serve import free_port

CHATTY = str(Path(__file__).with_name("chatty_engine.py"))
SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _chatty(session: aiohttp.ClientSession, *extra: str, liveness: Liveness | None = None,
            **managed: Any) -> tuple[ManagedEngine, int]:
    port = free_port()
    config = ManagedConfig(command=[sys.executable, CHATTY, "--port", str(port), *extra],
                           **{"startup_timeout": 30, "stop_grace": 2, "backoff_initial": 0.1, **managed})
    engine = ManagedEngine("chatty", config, f"http://127.0.0.1:{port}/health", session,
                           liveness=liveness or Liveness())
    return engine, port


async def test_a_flood_of_output_and_a_70kb_line_do_not_stop_the_engine(session: aiohttp.ClientSession) -> None:
    engine, port = _chatty(session, "--flood")
    try:
        await engine.start()
        assert engine.state is EngineState.READY, engine.last_error
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "chatty"}) as answer:
            assert answer.status == 200
        await _until(lambda: any(line.startswith("serving on port") for line in engine.output), 5, "the output")
        lines = list(engine.output)
        assert "flood done" in lines and "004999 " + "y" * 92 in lines
    finally:
        await engine.stop()


async def test_a_hung_engine_is_restarted(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    hang = tmp_path / "hang"
    engine, _ = _chatty(session, "--hang-file", str(hang), liveness=Liveness(interval=0.2, timeout=0.5, failures=2))
    try:
        await engine.start()
        assert engine.ready.is_set()
        first = engine.status()["pid"]
        hang.touch()  # from the next request on, the engine answers nothing, though its process runs
        await _until(lambda: not engine.ready.is_set(), 10, "ready to be cleared")
        assert engine.last_error is not None and "did not answer" in engine.last_error
        await engine.wait_ready(30)
        assert engine.restarts == 1 and engine.status()["pid"] not in (None, first)
        assert not _alive(first)
    finally:
        await engine.stop()


async def test_a_busy_engine_that_keeps_printing_is_not_restarted(session: aiohttp.ClientSession,
                                                                   tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    engine, port = _chatty(session, "--busy-file", str(busy),
                           liveness=Liveness(interval=0.2, timeout=0.3, failures=2))
    try:
        await engine.start()
        busy.touch()  # /health answers nothing from now on, but the engine prints and serves
        await asyncio.sleep(3)  # ten probes missed
        assert engine.ready.is_set() and engine.restarts == 0
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "chatty"}) as answer:
            assert answer.status == 200
    finally:
        await engine.stop()


async def test_a_failing_on_ready_hook_leaves_the_engine_serving(session: aiohttp.ClientSession) -> None:
    async def discovery_got_a_list() -> None:
        raise AttributeError("'list' object has no attribute 'get'")

    engine, _ = _chatty(session, liveness=Liveness(interval=0.2, timeout=1.0))
    engine.on_ready = discovery_got_a_list
    try:
        await engine.start()
        await asyncio.sleep(0.5)  # a few health probes later
        assert engine.ready.is_set() and engine.state is EngineState.READY
        assert engine.restarts == 0 and engine.status()["pid"] is not None
        await engine.wait_ready(0.1)
    finally:
        await engine.stop()


async def test_failures_tell_clients_little_and_operators_more_without_secrets(
        session: aiohttp.ClientSession) -> None:
    port = free_port()
    command = [sys.executable, "-c", f"print('loading with key {SECRET}', flush=True); import time; time.sleep(60)",
               "--api-key", SECRET, f"HF_TOKEN={SECRET}x"]
    config = ManagedConfig(command=command, startup_timeout=1, restart="never", stop_grace=1)
    engine = ManagedEngine("slow", config, f"http://user:hunter22@127.0.0.1:{port}/health", session)
    await engine.start()
    with pytest.raises(EngineFailed) as failed:
        await engine.wait_ready(1)
    status = engine.status()
    await engine.stop()
    client_message = str(failed.value)
    assert client_message == engine.failure == "engine slow did not become ready within 1s (startup_timeout)"
    operator = failed.value.detail + " " + str(status)
    assert f"127.0.0.1:{port}/health" in operator and "loading with key ***" in operator
    assert SECRET not in operator and "hunter22" not in operator
    assert status["command"][-3:] == ["--api-key", "***", "HF_TOKEN=***"]


async def test_a_crashed_engine_does_not_leave_its_workers_behind(session: aiohttp.ClientSession,
                                                                  tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    engine, _ = _chatty(session, "--worker-pid-file", str(pid_file))
    try:
        await engine.start()
        worker = int(pid_file.read_text())
        assert _alive(worker)
        os.kill(engine.status()["pid"], 9)  # the engine dies; its worker still holds GPU memory
        await _until(lambda: not _alive(worker), 10, "the worker to be ended with its engine")
        await engine.wait_ready(30)
        assert engine.restarts == 1
    finally:
        await engine.stop()
    assert not _alive(int(pid_file.read_text()))
