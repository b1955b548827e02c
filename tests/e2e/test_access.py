"""Who may call what: a configured master key is enforced everywhere but health; admin stays local without one."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

MESSAGES = [{"role": "user", "content": "Hi"}]
KEY = "sk-master-1234"


def _keyed(vllm: FakeVLLM) -> dict[str, object]:
    return {"auth": {"master_key": KEY}, "backends": {"v": {"url": vllm.url}}}


def test_a_master_key_is_required_for_inference(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(_keyed(vllm))
    with gw.client() as wrong, pytest.raises(openai.AuthenticationError):  # the harness sends "test-key"
        wrong.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0) as right:
        answer = right.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    assert answer.choices[0].message.content
    assert sum(1 for r in vllm.requests if r.path == "/v1/chat/completions") == 1, "the refused call never left"


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/admin/engines", "/admin/gpu", "/nowhere"])
def test_every_route_but_health_needs_the_key(start_gateway: GatewayFactory, vllm: FakeVLLM, path: str) -> None:
    gw = start_gateway(_keyed(vllm))
    with gw.http() as http:
        refused = http.get(path)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert http.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code != 401
        assert http.get(path, headers={"x-api-key": KEY}).status_code != 401
        assert http.get("/health/live").status_code == 200
        assert http.get("/health/ready").status_code == 200


def test_a_litellm_master_key_is_enforced(tmp_path: object, vllm: FakeVLLM) -> None:
    litellm = f"""
model_list:
  - model_name: "*"
    litellm_params: {{model: "openai/*", api_base: "{vllm.url}/v1"}}
general_settings:
  master_key: {KEY}
"""
    with ThreadGateway(litellm) as gw, gw.http() as http:
        body = {"model": "llama-3.2-8b", "messages": MESSAGES}
        assert http.post("/v1/chat/completions", json=body).status_code == 401
        ok = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text


def _raw_post(url: str, path: str, headers: dict[str, str]) -> int:
    with httpx.Client(base_url=url) as http:
        return http.post(path, headers=headers).status_code


def test_without_a_key_admin_answers_only_local_json_calls(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}}})
    port = gw.url.rsplit(":", 1)[1]
    with gw.http() as http:
        assert http.get("/admin/engines").status_code == 200  # loopback peer, loopback Host
        rebound = http.get("/admin/engines", headers={"Host": f"attacker.example:{port}"})
        assert rebound.status_code == 403, "a DNS-rebound name must not reach admin routes"
        assert "master key" in rebound.json()["error"]["message"]
    # A web page can POST without preflight only as text/plain, a form or no body at all.
    assert _raw_post(gw.url, "/admin/gpu/x/sleep", {"Content-Type": "text/plain"}) == 403
    assert _raw_post(gw.url, "/admin/gpu/x/sleep", {}) == 403
    # A JSON call from this machine gets through to the route (404: no gpu section).
    assert _raw_post(gw.url, "/admin/gpu/x/sleep", {"Content-Type": "application/json"}) == 404
