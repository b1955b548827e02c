"""Several deployments of one model: balancing, failover before the first byte, cooldown, fallbacks."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import GatewayFactory, dead_url
from tests.fakes.vllm import FakeVLLM

MESSAGES = [{"role": "user", "content": "Hello"}]


def chats(fake: FakeVLLM) -> int:
    """Inference requests the fake received (health probes aside)."""
    return sum(1 for r in fake.requests if r.path == "/v1/chat/completions")


def _two_deployments(first: str, second: str, **routing: object) -> dict[str, object]:
    return {
        "backends": {"a": {"url": first, "discover": False}, "b": {"url": second, "discover": False}},
        "routes": [{"model": "llama-3.2-8b", "deployments": [{"backend": "a"}, {"backend": "b"}]}],
        "routing": {"retries": 2, "allowed_fails": 2, "cooldown": 60, **routing},
        "timeouts": {"first_byte": 1.0, "connect": 1.0},
    }


def test_a_dead_deployment_never_fails_a_request(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(_two_deployments(dead_url(), vllm.url))
    with gw.client() as client:
        answers = [client.chat.completions.with_raw_response.create(model="llama-3.2-8b", messages=MESSAGES)
                   for _ in range(20)]
    assert all(a.headers["x-synapse-backend"] == "b" for a in answers)
    assert chats(vllm) == 20
    dead = gw.gateway.catalog.router.exact["llama-3.2-8b"].deployments[0]
    assert dead.cooldown_until > 0, "the dead deployment was put in cooldown"
    with gw.http() as http:
        metrics = http.get("/metrics").text
    assert 'synapse_upstream_errors_total{backend="a",kind="connect"}' in metrics
    assert 'synapse_retries_total{backend="b",model="llama-3.2-8b"}' in metrics


def test_load_is_balanced_by_requests_in_flight(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                vllm2: FakeVLLM) -> None:
    gw = start_gateway(_two_deployments(vllm.url, vllm2.url))
    with gw.client() as client:
        for _ in range(10):
            client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    assert chats(vllm) == 5
    assert chats(vllm2) == 5


def test_a_5xx_before_the_first_byte_fails_over(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                vllm2: FakeVLLM) -> None:
    vllm.fail_status = 500
    gw = start_gateway(_two_deployments(vllm.url, vllm2.url))
    with gw.client() as client:
        for _ in range(4):
            completion = client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
            assert completion.choices[0].message.content == "second replica says hi"


def test_a_hung_deployment_fails_over_after_the_first_byte_timeout(start_gateway: GatewayFactory,
                                                                  vllm: FakeVLLM, vllm2: FakeVLLM) -> None:
    vllm.hang = True
    gw = start_gateway(_two_deployments(vllm.url, vllm2.url, retries=1))
    with gw.client() as client:
        for _ in range(2):
            stream = client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == "second replica says hi"


def test_no_retry_once_the_first_byte_was_sent(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                               vllm2: FakeVLLM) -> None:
    vllm.drop_after_chunks = 2
    vllm2.drop_after_chunks = 2
    gw = start_gateway(_two_deployments(vllm.url, vllm2.url))
    with gw.client() as client:
        stream = client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True)
        received = []
        with pytest.raises(openai.APIError, match="dropped the stream"):
            for chunk in stream:
                received.append(chunk)
    assert len(received) >= 1
    assert chats(vllm) + chats(vllm2) == 1


def test_every_deployment_unreachable_is_503_with_retry_after(start_gateway: GatewayFactory) -> None:
    gw = start_gateway(_two_deployments(dead_url(), dead_url()))
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES})
    assert answer.status_code == 503
    assert answer.headers["retry-after"].isdigit()
    assert answer.json()["error"]["code"] == "backend_unavailable"


def test_a_backend_timeout_is_504(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    vllm.hang = True
    config = _two_deployments(vllm.url, vllm.url, retries=0)
    gw = start_gateway(config)
    with gw.client() as client, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    assert caught.value.status_code == 504


def test_a_backend_5xx_is_502_without_its_body(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    vllm.fail_status = 500
    gw = start_gateway(_two_deployments(vllm.url, vllm.url, retries=1))
    with gw.client() as client, pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    assert caught.value.status_code == 502
    message = caught.value.response.json()["error"]["message"]
    assert message in {"backend a answered HTTP 500", "backend b answered HTTP 500"}
    assert "fake engine failure" not in caught.value.response.text


def test_a_5xx_is_not_retried_on_the_same_deployment(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    """The request reached the engine: sending it again could crash it again, or do the work twice."""
    vllm.fail_status = 500
    gw = start_gateway({"backends": {"v": {"url": vllm.url, "discover": False}},
                        "routes": [{"model": "llama-3.2-8b", "backend": "v"}], "routing": {"retries": 2}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES})
    assert answer.status_code == 502
    assert chats(vllm) == 1


def test_a_refused_connection_is_retried_on_the_same_deployment(start_gateway: GatewayFactory) -> None:
    gw = start_gateway({"backends": {"d": {"url": dead_url(), "discover": False}},
                        "routes": [{"model": "m", "backend": "d"}], "routing": {"retries": 2, "allowed_fails": 9}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        metrics = http.get("/metrics").text
    assert answer.status_code == 503
    assert 'synapse_upstream_errors_total{backend="d",kind="connect"} 3.0' in metrics


def test_a_backend_4xx_envelope_is_passed_through(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}}})
    with gw.http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b"})  # no messages
    assert answer.status_code == 400
    # vLLM's own envelope, byte for byte in meaning: its type, its param and its integer code.
    error = answer.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "messages", 400)
    assert "messages" in error["message"].lower()
    assert chats(vllm) == 1, "a 4xx is the client's fault: no retry"


def test_litellm_fallbacks_move_to_another_model(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                 tmp_path: object) -> None:
    config = {
        "backends": {"dead": {"url": dead_url(), "discover": False}, "v": {"url": vllm.url, "discover": False}},
        "routes": [
            {"model": "big", "backend": "dead", "fallbacks": ["small"]},
            {"model": "small", "backend": "v", "upstream": "llama-3.2-8b"},
        ],
        "routing": {"retries": 0},
    }
    gw = start_gateway(config)
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="big", messages=MESSAGES)
    assert raw.headers["x-synapse-backend"] == "v"
