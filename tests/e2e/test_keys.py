"""Virtual keys end to end with the official openai client: what a key may call, and every known bypass."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, dead_url
from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ThreadGateway

MASTER = "sk-master-test-1234"
MESSAGES = [{"role": "user", "content": "Hi"}]
ADMIN = {"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"}


def keyed(backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"auth": {"mode": "required", "master_key": MASTER}, "backends": backends, **extra}


def new_key(gw: ThreadGateway, **settings: Any) -> str:
    with gw.http() as http:
        answer = http.post("/key/generate", json=settings, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    key: str = answer.json()["key"]
    return key


def client(gw: ThreadGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def chat_calls(fake: FakeVLLM) -> list[str]:
    """The models the fake was asked for, in order."""
    return [r.body["model"] for r in fake.requests if r.path == "/v1/chat/completions"]


def test_a_generated_key_runs_inference_and_is_shown_once(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    with gw.http() as http:
        made = http.post("/key/generate", json={"key_alias": "ci", "models": ["llama-*"]}, headers=ADMIN).json()
        key, key_id = made["key"], made["key_id"]
        assert key.startswith(f"sk-syn-{key_id}-") and len(key) >= len(f"sk-syn-{key_id}-") + 22  # >= 128 bits
        listed = http.get("/key/list", params={"return_full_object": "true"}, headers=ADMIN).json()
        info = http.get("/key/info", params={"key": key_id}, headers=ADMIN).json()
    assert [k["key_id"] for k in listed["keys"]] == [key_id]
    secret = key.rsplit("-", 1)[1]
    assert secret not in str(listed) and secret not in str(info), "the secret is shown once, at creation"
    assert info["info"]["key_alias"] == "ci" and info["info"]["models"] == ["llama-*"]
    with client(gw, key) as c:
        assert c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices[0].message.content


def test_missing_unknown_expired_and_revoked_keys_get_one_answer(start_gateway: GatewayFactory,
                                                                 vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    expiring = new_key(gw, duration="1s")
    revoked = new_key(gw)
    with gw.http() as http:
        assert http.post("/key/block", json={"key": revoked}, headers=ADMIN).json()["revoked"] is True
    time.sleep(1.1)
    forged = expiring[:-4] + "AAAA"
    answers = []
    for key in (None, "sk-unknown", forged, expiring, revoked):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with gw.http() as http:
            answer = http.post("/v1/chat/completions", json={"model": "llama-3.2-8b", "messages": MESSAGES},
                               headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        answers.append(answer.json()["error"]["message"])
        if key:
            assert key not in answer.text and key[-8:] not in answer.text, "no part of a key is echoed"
    assert len(set(answers)) == 1, answers
    assert chat_calls(vllm) == []


def test_the_body_model_is_the_only_model_input(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url, "models": ["llama-3.2-8b", "secret-70b"]}},
                             routes=[{"model": "secret-70b", "backend": "v"}]))
    key = new_key(gw, models=["llama-3.2-8b"])
    with gw.http() as http:
        answer = http.post("/v1/chat/completions?model=llama-3.2-8b",
                           json={"model": "secret-70b", "messages": MESSAGES},
                           headers={"Authorization": f"Bearer {key}", "x-model": "llama-3.2-8b"})
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "model_not_allowed"
    assert "secret-70b" in answer.json()["error"]["message"]
    assert chat_calls(vllm) == []


def test_an_alias_is_judged_by_the_model_it_resolves_to(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    routes = [{"model": "big-70b", "backend": "v", "upstream": "llama-3.2-8b", "aliases": ["small-fast"]}]
    gw = start_gateway(keyed({"v": {"url": vllm.url, "discover": False}}, routes=routes))
    key = new_key(gw, models=["small-*"])
    with client(gw, key) as c:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            c.chat.completions.create(model="small-fast", messages=MESSAGES)
        assert "small-fast" in str(refused.value) and "big-70b" not in str(refused.value), "the target stays unknown"
        assert [m.id for m in c.models.list()] == [], "the listing judges an alias by its target too"
    assert chat_calls(vllm) == []
    target = new_key(gw, models=["big-70b"])
    with client(gw, target) as c:
        assert sorted(m.id for m in c.models.list()) == ["big-70b", "small-fast"]
        assert c.models.retrieve("small-fast").id == "small-fast"
        assert c.chat.completions.create(model="small-fast", messages=MESSAGES).choices


def test_a_pattern_route_serves_only_the_allowed_names(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    routes = [{"pattern": "team/*", "backend": "v", "upstream": "llama-3.2-8b"}]
    gw = start_gateway(keyed({"v": {"url": vllm.url, "discover": False}}, routes=routes))
    key = new_key(gw, models=["team/a"])
    with client(gw, key) as c:
        assert c.chat.completions.create(model="team/a", messages=MESSAGES).choices
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="team/b", messages=MESSAGES)
    assert len(chat_calls(vllm)) == 1


def test_an_unknown_model_does_not_reach_the_fallback(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}, fallback="v"))
    key = new_key(gw, models=["llama-3.2-8b"])
    with client(gw, key) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="anything-else", messages=MESSAGES)
    assert chat_calls(vllm) == []


def test_a_fallback_to_a_model_the_key_may_not_use_is_skipped(start_gateway: GatewayFactory,
                                                              vllm: FakeVLLM) -> None:
    backends = {"down": {"url": dead_url(), "discover": False}, "v": {"url": vllm.url, "discover": False}}
    routes = [{"model": "primary", "backend": "down", "fallbacks": ["secret"]},
              {"model": "secret", "backend": "v", "upstream": "llama-3.2-8b"}]
    gw = start_gateway(keyed(backends, routes=routes))
    allowed_primary = new_key(gw, models=["primary"])
    allowed_both = new_key(gw, models=["primary", "secret"])
    with client(gw, allowed_primary) as c, pytest.raises(openai.APIStatusError) as failed:
        c.chat.completions.create(model="primary", messages=MESSAGES)
    assert failed.value.status_code == 503, "the primary's own failure, not the secret model's answer"
    assert chat_calls(vllm) == []
    with client(gw, allowed_both) as c:
        assert c.chat.completions.create(model="primary", messages=MESSAGES).choices
    assert chat_calls(vllm) == ["llama-3.2-8b"]


def test_models_list_shows_only_the_keys_models(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    routes = [{"model": "other", "backend": "v", "upstream": "llama-3.2-8b"}]
    gw = start_gateway(keyed({"v": {"url": vllm.url}}, routes=routes))
    key = new_key(gw, models=["llama-3.2-8b"])
    with client(gw, key) as c:
        assert [m.id for m in c.models.list()] == ["llama-3.2-8b"]
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("other")
    with client(gw, MASTER) as c:
        assert sorted(m.id for m in c.models.list()) == ["llama-3.2-8b", "other"]


def test_scopes_keep_admin_and_inference_apart(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    inference, admin = new_key(gw), new_key(gw, scope="admin")
    with gw.http() as http:
        for path in ("/admin/engines", "/key/list"):
            refused = http.get(path, headers={"Authorization": f"Bearer {inference}"})
            assert refused.status_code == 403, path
            assert http.get(path, headers={"Authorization": f"Bearer {admin}"}).status_code == 200, path
        made = http.post("/key/generate", json={}, headers={"Authorization": f"Bearer {admin}"})
        assert made.status_code == 200, "an admin key manages keys"
        assert http.get("/metrics", headers={"Authorization": f"Bearer {inference}"}).status_code == 403
        assert http.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
        public = http.get("/health/ready", headers={"Authorization": f"Bearer {inference}"}).json()
        detailed = http.get("/health/ready", headers={"Authorization": f"Bearer {admin}"}).json()
        assert public == {"status": "ready"}, "which backends and models exist is for admins"
        assert detailed["status"] == "ready" and "v" in detailed["backends"]
    with client(gw, admin) as c, pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
    assert chat_calls(vllm) == []


def test_key_management_refuses_bad_input_clearly(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    with gw.http() as http:
        typo = http.post("/key/generate", json={"rpm_limt": 5}, headers=ADMIN)
        assert typo.status_code == 400 and typo.json()["error"]["param"] == "rpm_limt"
        negative = http.post("/key/generate", json={"rpm_limit": 0}, headers=ADMIN)
        assert negative.status_code == 400 and negative.json()["error"]["param"] == "rpm_limit"
        period = http.post("/key/generate", json={"budget_duration": "fortnight"}, headers=ADMIN)
        assert period.status_code == 400
        custom = http.post("/key/generate", json={"key": "sk-my-own"}, headers=ADMIN)
        assert custom.status_code == 400 and custom.json()["error"]["param"] == "key"
        stringly = http.post("/key/generate", json={"blocked": "false"}, headers=ADMIN)
        assert stringly.status_code == 400, "a string is not a boolean: it must not revoke, nor not"
        litellm_only = http.post("/key/generate", json={"team_id": "t1", "user_id": "u"}, headers=ADMIN)
        assert litellm_only.status_code == 200 and litellm_only.json()["ignored_fields"] == ["team_id", "user_id"]
        missing = http.get("/key/info", params={"key": "nosuchkey123"}, headers=ADMIN)
        assert missing.status_code == 404
        assert http.get("/key/list", headers=ADMIN).json()["total_count"] == 1


def test_update_rotate_and_delete(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    key = new_key(gw, key_alias="before")
    with gw.http() as http:
        updated = http.post("/key/update", json={"key": key, "key_alias": "after", "rpm_limit": 7}, headers=ADMIN)
        assert updated.json()["key_alias"] == "after" and updated.json()["rpm_limit"] == 7
        rotated = http.post("/key/regenerate", json={"key": key}, headers=ADMIN).json()
    new = rotated["key"]
    assert new != key and rotated["key_id"] == updated.json()["key_id"] and rotated["rpm_limit"] == 7
    with client(gw, key) as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with client(gw, new) as c:
        assert c.models.list().data
    with gw.http() as http:
        missing = http.post("/key/delete", json={"keys": [new, "nosuchkey123"]}, headers=ADMIN)
        assert missing.status_code == 404
        assert http.post("/key/delete", json={"keys": [new, rotated["key_id"]]}, headers=ADMIN).json()[
            "deleted_keys"] == [rotated["key_id"]], "nothing was deleted by the refused call; duplicates count once"
    with client(gw, new) as c, pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_a_key_declared_in_the_config_works_and_cannot_be_changed_by_api(start_gateway: GatewayFactory,
                                                                          vllm: FakeVLLM) -> None:
    from synapse_gateway.access.keys import hash_key
    from synapse_gateway.access.keys import new_key as make_key

    key_id, key = make_key()
    declared = {"id": key_id, "hash": hash_key(key), "models": ["llama-3.2-8b"], "key_alias": "gitops"}
    gw = start_gateway({"auth": {"master_key": MASTER, "keys": [declared]}, "backends": {"v": {"url": vllm.url}}})
    with client(gw, key) as c:
        assert c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES).choices
    with gw.http() as http:
        blocked = http.post("/key/block", json={"key": key_id}, headers=ADMIN)
    assert blocked.status_code == 409 and "config" in blocked.json()["error"]["message"]


def test_no_key_material_reaches_the_logs(start_gateway: GatewayFactory, vllm: FakeVLLM,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    key = new_key(gw, models=["llama-3.2-8b"], rpm_limit=1)
    with client(gw, key) as c:
        c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="other", messages=MESSAGES)
    with client(gw, key[:-3] + "xyz") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with gw.http() as http:
        metrics = http.get("/metrics", headers=ADMIN).text
    secret = key.rsplit("-", 1)[1]
    # The gateway's own log records (the test's HTTP clients log their own requests, key included, at DEBUG).
    ours = [r for r in caplog.records if r.name.startswith(("synapse", "aiohttp"))]
    assert ours, "the gateway logged something to search"
    logged = "".join(r.getMessage() + str(r.__dict__) for r in ours)
    access = str(gw.access_lines(4))
    for text in (logged, access, metrics):
        assert secret not in text and secret[:8] not in text and MASTER not in text
    assert key.split("-")[2] in access, "the public id is what identifies a key in the access log"


def test_rate_headers_on_every_answer_and_429(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}, auth={"mode": "required", "master_key": MASTER,
                                                            "rate_limit_headers": "always"}))
    key = new_key(gw, rpm_limit=2, tpm_limit=100000)
    body = {"model": "llama-3.2-8b", "messages": MESSAGES, "max_tokens": 10}
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as http:
        first = http.post("/v1/chat/completions", json=body)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-limit-tokens"] == "100000"
        assert 0 < int(first.headers["x-ratelimit-remaining-tokens"]) < 100000
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        refused = http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(chat_calls(vllm)) == 2


def test_by_default_rate_headers_come_with_the_429(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway(keyed({"v": {"url": vllm.url}}))
    key = new_key(gw, rpm_limit=1)
    body = {"model": "llama-3.2-8b", "messages": MESSAGES}
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as http:
        served = http.post("/v1/chat/completions", json=body)
        refused = http.post("/v1/chat/completions", json=body)
    assert served.status_code == 200 and "x-ratelimit-limit-requests" not in served.headers
    assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "Retry-After" in refused.headers
