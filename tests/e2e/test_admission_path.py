"""The request path through admission: GPU waits, keep-alives, failover into a started stream, readiness."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway, free_port

MESSAGES = [{"role": "user", "content": "Hi"}]


def _asleep(fake: FakeVLLM) -> FakeVLLM:
    fake.sleeping_tags, fake.sleep_level = {"weights", "kv_cache"}, 1
    return fake


@pytest.fixture
def sleepy() -> Iterator[FakeVLLM]:
    with FakeVLLM(["llama-3.2-8b"], sleep_mode=True, reply="sleepy says hi") as fake:
        yield _asleep(fake)


@pytest.fixture
def sleepy2() -> Iterator[FakeVLLM]:
    with FakeVLLM(["llama-3.2-8b"], sleep_mode=True, reply="second says hi") as fake:
        yield _asleep(fake)


def _vllm_backend(fake: FakeVLLM, memory: str = "10GiB") -> dict[str, object]:
    return {"url": fake.url, "protocol": "vllm", "models": ["llama-3.2-8b"], "discover": False,
            "lifecycle": {"driver": "vllm-sleep", "memory": memory, "canary": False}}


def _frames(response: httpx.Response) -> list[str]:
    return response.text.split("\n\n")


def test_a_failed_wake_is_not_retried_on_the_same_unit(start_gateway: GatewayFactory, sleepy: FakeVLLM) -> None:
    """F7: one wake attempt per request per unit, even with `retries: 2` and a single deployment."""
    sleepy.fail_next_wake = True
    gw = start_gateway({"gpu": {"memory": "16GiB", "max_wait": "20s"}, "backends": {"v": _vllm_backend(sleepy)},
                        "routing": {"retries": 2}})
    with gw.http() as http:
        refused = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES})
        assert refused.status_code == 503
        assert refused.headers["retry-after"].isdigit()
        assert [r.path for r in sleepy.requests if r.path.startswith("/wake_up")] == ["/wake_up"]
        served = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES})
    assert served.status_code == 200, "the next request wakes it"


def test_a_stream_that_waited_fails_over_into_the_same_answer(start_gateway: GatewayFactory, sleepy: FakeVLLM,
                                                              sleepy2: FakeVLLM) -> None:
    """Keep-alives are comments: when the first unit cannot wake, the second answers into the same stream."""
    sleepy.fail_next_wake = True
    sleepy.wake_delay = sleepy2.wake_delay = 0.5
    gw = start_gateway({
        "gpu": {"memory": "16GiB", "keepalive_interval": "0.1s"},
        "backends": {"a": _vllm_backend(sleepy, "6GiB"), "b": _vllm_backend(sleepy2, "6GiB")},
        "routes": [{"model": "llama-3.2-8b", "deployments": [{"backend": "a"}, {"backend": "b"}]}],
    })
    gw.gateway.proxy.balancer._turn = 1  # both must wait: ties take turns, and this turn puts `a` first
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES,
                                                          "stream": True})
    frames = _frames(answer)
    assert answer.status_code == 200
    assert frames[0].startswith(": waiting for a to wake")
    data = [f for f in frames if f.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert not any('"error"' in f for f in data)
    chunks = [orjson.loads(f.removeprefix("data: ")) for f in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "second says hi"
    assert len([r for r in sleepy.requests if r.path.startswith("/wake_up")]) == 1, "a was tried first"
    assert sleepy.requests_while_sleeping == 0 and sleepy2.requests_while_sleeping == 0


def test_a_stream_whose_wake_fails_everywhere_ends_with_one_error_event(start_gateway: GatewayFactory,
                                                                        sleepy: FakeVLLM) -> None:
    sleepy.fail_next_wake = True
    sleepy.wake_delay = 0.4
    gw = start_gateway({"gpu": {"memory": "16GiB", "keepalive_interval": "0.1s"},
                        "backends": {"v": _vllm_backend(sleepy)}, "routing": {"retries": 2}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES,
                                                          "stream": True})
    frames = [f for f in _frames(answer) if f]
    assert answer.status_code == 200
    assert frames[0].startswith(": waiting for v to wake")
    assert len([f for f in frames if f.startswith("data: ")]) == 1
    assert frames[-1].startswith('data: {"error"')
    assert len([r for r in sleepy.requests if r.path.startswith("/wake_up")]) == 1


def test_a_relayed_stream_keeps_every_frame_and_ends_with_done(start_gateway: GatewayFactory,
                                                               vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES,
                                                          "stream": True})
    frames = _frames(answer)
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: {") for f in frames[:-2])
    assert answer.headers["content-type"].startswith("text/event-stream")


SLOW_ENGINE = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    time.sleep(float(sys.argv[2]))
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"object": "list", "data": [{"id": "slow-model", "object": "model"}]}'
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def log_message(self, *args): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_ready_waits_for_the_engines_and_their_models(tmp_path: Path) -> None:
    """Item 7: ready means the managed engines serve and their models are routable."""
    script = tmp_path / "engine.py"
    script.write_text(SLOW_ENGINE)
    port = free_port()
    config = {"backends": {"slow": {"url": f"http://127.0.0.1:{port}",
                                    "managed": {"command": [sys.executable, str(script), str(port), "1.5"],
                                                "startup_timeout": 30}}}}
    with ThreadGateway(config) as gw, gw.http() as http:
        first = http.get("/health/ready")
        assert first.status_code == 503 and first.json()["status"] == "starting"
        deadline = time.monotonic() + 30
        while (ready := http.get("/health/ready")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
        assert ready.json()["status"] == "ready"
        assert "slow-model" in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_ready_reports_a_failed_engine_instead_of_hiding_it(tmp_path: Path) -> None:
    config = {"backends": {"broken": {"url": f"http://127.0.0.1:{free_port()}",
                                      "managed": {"command": [sys.executable, "-c", "raise SystemExit(3)"],
                                                  "restart": "never", "startup_timeout": 10}}}}
    with ThreadGateway(config) as gw, gw.http() as http:
        deadline = time.monotonic() + 20
        while (ready := http.get("/health/ready")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
    assert ready.json()["status"] == "degraded"
    assert ready.json()["failed_engines"] == ["broken"]


def test_health_never_shows_backend_credentials(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    url = vllm.url.replace("http://", "http://user:secret@")
    gw = start_gateway({"backends": {"v": {"url": url}}})
    with gw.http() as http:
        ready = http.get("/health/ready")
    assert "secret" not in ready.text
    assert ready.json()["backends"]["v"]["url"] == vllm.url
