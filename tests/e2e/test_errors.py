"""Bad input gets a clear OpenAI error, a log line that says why, and leaves other requests alone."""

from __future__ import annotations

import socket

import httpx
import openai
import orjson
import pytest

from synapse_gateway.routing import Router
from tests.conftest import GatewayFactory
from tests.fakes.vllm import FakeVLLM

MESSAGES = [{"role": "user", "content": "Hello"}]


def _config(vllm: FakeVLLM, **server: object) -> dict[str, object]:
    return {"backends": {"v": {"url": vllm.url}}, "server": server}


@pytest.mark.parametrize(("body", "param", "code"), [
    (b'{"model": "llama-3.2-8b", "messages": [', None, "invalid_json"),
    (b"", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b'{"messages": []}', "model", "missing_model"),
    (b'{"model": 42, "messages": []}', "model", "invalid_model"),
    (b'{"model": "llama-3.2-8b", "stream": "yes"}', "stream", "invalid_type"),
])
def test_malformed_requests_are_400(start_gateway: GatewayFactory, vllm: FakeVLLM, body: bytes,
                                    param: str | None, code: str) -> None:
    gw = start_gateway(_config(vllm))
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert answer.headers["x-request-id"]
    logged = gw.access_lines()
    assert logged and logged[-1]["status"] == 400 and logged[-1]["error"]


def test_openai_client_sees_bad_request(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(_config(vllm))
    with gw.client() as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=MESSAGES)  # type: ignore[arg-type]
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "model"


def test_oversized_body_is_413_and_the_gateway_keeps_serving(start_gateway: GatewayFactory,
                                                            vllm: FakeVLLM) -> None:
    gw = start_gateway(_config(vllm, max_body_size="1MiB"))
    big = orjson.dumps({"model": "llama-3.2-8b", "messages": [{"role": "user", "content": "x" * 3_000_000}]})
    with gw.client() as client, gw.http() as http:
        answer = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="llama-3.2-8b",
                                           messages=[{"role": "user", "content": "x" * 3_000_000}])
        assert caught.value.status_code == 413
        completion = client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert all(len((r.body and orjson.dumps(r.body)) or b"") < 1_000_000 for r in vllm.requests)


def test_oversized_chunked_body_is_413(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(_config(vllm, max_body_size="64KiB"))

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "llama-3.2-8b", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 4096
        yield b'"}]}'

    with gw.http() as http:
        answer = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert answer.status_code == 413
        assert http.post("/v1/chat/completions",
                         json={"model": "llama-3.2-8b", "messages": MESSAGES}).status_code == 200


def test_413_is_answered_before_the_body_is_sent(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    """The limit is checked from Content-Length: a client that announces 1 GiB gets 413 at once."""
    gw = start_gateway(_config(vllm))
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1073741824\r\n\r\n{\"model\":")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")


def test_a_crashing_backend_does_not_disturb_other_requests(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                            vllm2: FakeVLLM) -> None:
    vllm.drop_after_chunks = 0
    gw = start_gateway({"backends": {"bad": {"url": vllm.url, "discover": False},
                                     "good": {"url": vllm2.url, "discover": False}},
                        "routes": [{"model": "bad", "backend": "bad", "upstream": "llama-3.2-8b"},
                                   {"model": "good", "backend": "good", "upstream": "llama-3.2-8b"}],
                        "routing": {"retries": 0}})
    with gw.http() as http:
        for _ in range(3):
            bad = http.post("/v1/chat/completions", json={"model": "bad", "messages": MESSAGES, "stream": True})
            good = http.post("/v1/chat/completions", json={"model": "good", "messages": MESSAGES})
            assert bad.status_code == 502
            assert good.status_code == 200


def test_internal_error_message_names_the_request_id(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gw = start_gateway(_config(vllm))

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(Router, "lookup", explode)
    with httpx.Client(base_url=gw.url) as http:
        answer = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                           headers={"X-Request-Id": "req-123"})
    assert answer.status_code == 500
    assert answer.json()["error"]["message"] == "internal error (request id req-123)"
    assert "secret" not in answer.text
