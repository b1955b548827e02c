"""Each routing path through a running gateway, with the official openai client against faithful fakes."""

from __future__ import annotations

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, dead_url
from tests.fakes._base import json_response
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm import FakeVLLM

MESSAGES = [{"role": "user", "content": "Hello"}]


def _config(vllm: FakeVLLM, ollama: FakeOllama, **extra: object) -> dict[str, object]:
    config: dict[str, object] = {
        "backends": {
            "vllm-inference": {"url": vllm.url, "protocol": "vllm", "discover": True},
            "ollama": {"url": ollama.url, "protocol": "ollama", "discover": True},
        },
        "routes": [
            {"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm-inference", "upstream": "llama-3.2-8b"},
            {"pattern": "ollama/*", "backend": "ollama", "upstream": "*"},
        ],
        "fallback": "ollama",
        "discovery": {"min_refresh_gap": 0, "negative_ttl": 30},
    }
    config.update(extra)
    return config


def test_exact_route_renames_the_model_upstream(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "fake reply from llama-3.2-8b"
    assert raw.headers["x-synapse-backend"] == "vllm-inference"
    assert len(raw.headers["x-request-id"]) >= 16
    assert vllm.requests[-1].body["model"] == "llama-3.2-8b"
    assert vllm.requests[-1].headers["x-request-id"] == raw.headers["x-request-id"]


def test_alias_reaches_the_route_under_its_upstream_name(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                        ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.client() as client:
        completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.model == "llama-3.2-8b"
    assert vllm.requests[-1].body["model"] == "llama-3.2-8b"


def test_alias_without_upstream_is_sent_as_the_routes_model(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                          ollama: FakeOllama) -> None:
    config = _config(vllm, ollama)
    config["routes"] = [{"model": "llama-3.2-8b", "aliases": ["house-model"], "backend": "vllm-inference"}]
    gw = start_gateway(config)
    with gw.client() as client:
        completion = client.chat.completions.create(model="house-model", messages=MESSAGES)
    assert completion.model == "llama-3.2-8b"
    assert vllm.requests[-1].body["model"] == "llama-3.2-8b"


def test_glob_pattern_maps_the_wildcard_to_the_upstream_name(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                             ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="ollama/qwen2.5:7b", messages=MESSAGES)
    assert raw.headers["x-synapse-backend"] == "ollama"
    assert raw.parse().choices[0].message.content == "fake reply from qwen2.5:7b"
    assert ollama.requests[-1].path == "/v1/chat/completions"
    assert ollama.requests[-1].body["model"] == "qwen2.5:7b"


def test_discovered_model_is_routed_to_the_backend_that_serves_it(start_gateway: GatewayFactory,
                                                                 vllm: FakeVLLM, ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.client() as client:
        raw = client.completions.with_raw_response.create(model="llama3.1:8b", prompt="Hi", max_tokens=4)
    assert raw.headers["x-synapse-backend"] == "ollama"
    assert ollama.requests[-1].path == "/v1/completions"


def test_model_added_later_is_found_by_a_refresh_on_miss(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                        ollama: FakeOllama) -> None:
    config = _config(vllm, ollama, fallback=None)
    gw = start_gateway(config)
    vllm.models.append("mistral-7b")
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="mistral-7b", messages=MESSAGES)
    assert raw.headers["x-synapse-backend"] == "vllm-inference"


def test_unknown_model_goes_to_the_fallback_with_its_name_unchanged(start_gateway: GatewayFactory,
                                                                   vllm: FakeVLLM, ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="mystery:1b", messages=MESSAGES)
    # Ollama itself says the model is missing; the gateway passes its OpenAI envelope through.
    assert "mystery:1b" in caught.value.message
    assert caught.value.response.headers["x-synapse-backend"] == "ollama"
    assert ollama.requests[-1].body["model"] == "mystery:1b"


def test_without_fallback_an_unknown_model_is_404_model_not_found(start_gateway: GatewayFactory,
                                                                 vllm: FakeVLLM, ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama, fallback=None))
    with gw.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="mystery:1b", messages=MESSAGES)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"


def test_a_repeated_miss_is_answered_from_the_negative_cache(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                            ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama, fallback=None))
    with gw.http() as http:
        before = vllm.paths().count("/v1/models")
        for _ in range(5):
            assert http.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES}).status_code == 404
    assert vllm.paths().count("/v1/models") == before + 1


def test_unknown_request_fields_are_forwarded_untouched(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                       ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    extra = {"top_k": 7, "guided_json": {"type": "object"}, "repetition_penalty": 1.1}
    with gw.client() as client:
        client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, extra_body=extra)
    body = vllm.requests[-1].body
    assert {k: body[k] for k in extra} == extra
    assert body["messages"] == MESSAGES


def test_embeddings_are_routed(start_gateway: GatewayFactory, vllm: FakeVLLM, ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.client() as client:
        result = client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert len(result.data) == 2
    assert ollama.requests[-1].path == "/v1/embeddings"


def test_models_lists_configured_and_discovered_models_once(start_gateway: GatewayFactory,
                                                           vllm: FakeVLLM) -> None:
    with FakeOllama(["llama3.1:8b", "llama-3.2-8b"]) as ollama:  # llama-3.2-8b is on both backends
        gw = start_gateway(_config(vllm, ollama))
        with gw.client() as client:
            ids = [m.id for m in client.models.list()]
            retrieved = client.models.retrieve("llama3.1:8b")
    assert len(ids) == len(set(ids))
    assert {"chat", "gpt-4o", "llama-3.2-8b", "llama3.1:8b"} <= set(ids)
    assert retrieved.owned_by == "ollama"
    with gw.client() as client, pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-there")


def test_model_ids_with_slashes_are_retrievable(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                                ollama: FakeOllama) -> None:
    vllm.models.append("meta-llama/Llama-3.2-1B")
    gw = start_gateway(_config(vllm, ollama))
    with gw.http() as http:
        answer = http.get("/v1/models/meta-llama/Llama-3.2-1B")
    assert answer.status_code == 200
    assert answer.json()["id"] == "meta-llama/Llama-3.2-1B"


def test_health_reports_each_backend(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"up": {"url": vllm.url}, "down": {"url": dead_url()}}})
    with gw.http() as http:
        assert http.get("/health/live").status_code == 200
        ready = http.get("/health/ready")
    assert ready.status_code == 200
    backends = ready.json()["backends"]
    assert backends["up"]["reachable"] is True
    assert backends["down"]["reachable"] is False
    assert backends["down"]["error"]


def test_unknown_path_and_method_get_openai_errors(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"up": {"url": vllm.url}}})
    with httpx.Client(base_url=gw.url) as http:
        missing = http.get("/v1/nothing")
        wrong = http.get("/v1/chat/completions")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_every_response_names_its_request_id_and_backend(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}}})
    with gw.http() as http:
        listing = http.get("/v1/models", headers={"X-Request-Id": "trace-42"})
        ready = http.get("/health/ready")
        routed = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES})
    assert listing.headers["x-request-id"] == "trace-42"
    assert listing.headers["x-synapse-backend"] == "none"
    assert len(ready.headers["x-request-id"]) == 32
    assert routed.headers["x-synapse-backend"] == "v"


class OddListing(FakeVLLM):
    """A vLLM whose /v1/models answers JSON that is not a model list."""

    listing: object = []

    async def _list_models(self, request: web.Request) -> web.Response:
        return json_response(self.listing)


@pytest.mark.parametrize("listing", [[], None, 3, {"data": "none"}])
def test_a_listing_of_the_wrong_shape_marks_the_backend_down_and_nothing_else(
        start_gateway: GatewayFactory, listing: object) -> None:
    with OddListing(["llama-3.2-8b"]) as odd:
        odd.listing = listing
        gw = start_gateway({"backends": {"odd": {"url": odd.url}},
                            "routes": [{"model": "chat", "backend": "odd", "upstream": "llama-3.2-8b"}],
                            "discovery": {"min_refresh_gap": 0}})
        with gw.http() as http:
            ready = http.get("/health/ready")
            routed = http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
            missing = http.post("/v1/chat/completions", json={"model": "other", "messages": MESSAGES})
    assert ready.status_code == 200
    backend = ready.json()["backends"]["odd"]
    assert backend["reachable"] is False
    assert "expected a JSON object with a `data` list" in backend["error"]
    assert routed.status_code == 200
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_found")


def test_an_overlong_model_name_is_refused(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                           ollama: FakeOllama) -> None:
    gw = start_gateway(_config(vllm, ollama))
    with gw.http() as http:
        before = vllm.paths().count("/v1/models")
        answer = http.post("/v1/chat/completions", json={"model": "ollama/" + "x" * 300, "messages": MESSAGES})
    assert answer.status_code == 400
    assert (answer.json()["error"]["param"], answer.json()["error"]["code"]) == ("model", "invalid_model")
    assert vllm.paths().count("/v1/models") == before
    assert not any(len(r.body.get("model", "")) > 256 for r in ollama.requests if isinstance(r.body, dict))
