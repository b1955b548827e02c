"""Bounds a client cannot push past: slow heads and bodies, huge or countless model names."""

from __future__ import annotations

import re
import socket
import time

import httpx
from aiohttp import web

from tests.conftest import GatewayFactory
from tests.fakes.server import BackgroundServer
from tests.fakes.vllm import FakeVLLM

MESSAGES = [{"role": "user", "content": "Hi"}]


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed (or answered and closed) the connection within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset
        return True
    return True


def test_a_request_head_that_never_completes_is_cut(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"server": {"header_timeout": "1s"}, "backends": {"v": {"url": vllm.url}}})
    with _open(gw.url) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.3)
        slow.sendall(b"X-Slow: 1\r\n")  # trickling header lines does not keep it open
        assert _closed_within(slow, 5.0)
    with gw.http() as http:
        assert http.get("/health/live").status_code == 200


def test_a_body_that_stalls_is_a_408(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"server": {"body_idle_timeout": "0.5s"}, "backends": {"v": {"url": vllm.url}}})
    with _open(gw.url) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        slow.settimeout(5)
        answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert not [r for r in vllm.requests if r.path == "/v1/chat/completions"]


async def _transcribe(request: web.Request) -> web.Response:
    await request.read()  # an engine reads the whole upload before it answers
    return web.json_response({"text": "heard"})


def test_an_upload_that_stalls_after_its_model_field_is_cut(start_gateway: GatewayFactory) -> None:
    """The file streams to the backend as it comes; a client that stops sending must not hold it."""
    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", _transcribe)
    engine = BackgroundServer(app)
    url = engine.start()
    gw = start_gateway({"server": {"body_idle_timeout": "0.5s"},
                        "backends": {"v": {"url": url, "discover": False, "models": ["whisper-1"]}}})
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\nRIFF").encode()
    with _open(gw.url) as slow:
        slow.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + head)
        slow.settimeout(10)
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"Connection: close" in answer
        assert gw.gateway.backends["v"].in_flight == 0, "the backend is let go as soon as the client stalls"
    engine.stop()


def test_a_model_name_past_256_characters_is_a_400(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "m" * 257, "messages": MESSAGES})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "model"


def test_client_model_names_never_become_metric_labels(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url, "discover": False}},
                        "routes": [{"pattern": "fake/*", "backend": "v"}], "routing": {"retries": 0}})
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        before = len(http.get("/metrics").text.splitlines())
        for n in range(50):
            http.post("/v1/chat/completions", json={"model": f"fake/name-{n}", "messages": MESSAGES})
            http.post("/v1/chat/completions", json={"model": f"unknown-{n}", "messages": MESSAGES})
        metrics = http.get("/metrics").text
    assert not re.search(r"name-\d|unknown-\d", metrics)
    assert 'model="fake/*"' in metrics
    assert len(metrics.splitlines()) < before + 120, "a few label sets, not one per name"
