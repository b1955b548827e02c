"""A LiteLLM proxy config works as is: deployments, wildcards, router settings, os.environ keys, master key."""

from __future__ import annotations

import pytest

from synapse_gateway.backends import Backend
from synapse_gateway.config import ConfigError, parse_config
from synapse_gateway.routing import Router

LITELLM = """
model_list:
  - model_name: llama-3.2-8b
    litellm_params:
      model: hosted_vllm/llama-3.2-8b
      api_base: http://vllm:8000/v1
      api_key: os.environ/SYNAPSE_TEST_VLLM_KEY
      timeout: 120
    model_info: {id: primary}
  - model_name: llama-3.2-8b
    litellm_params:
      model: openai/meta-llama/Llama-3.2-8B
      api_base: http://vllm-2:8000/v1
      rpm: 60
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, api_key: sk-test}
  - model_name: ollama/*
    litellm_params: {model: ollama/*, api_base: "http://ollama:11434"}
  - model_name: "*"
    litellm_params: {model: ollama_chat/*, api_base: "http://ollama:11434"}
  - model_name: claude
    litellm_params: {model: anthropic/claude-3-5-sonnet}
router_settings:
  num_retries: 3
  allowed_fails: 2
  cooldown_time: 45
  routing_strategy: latency-based-routing
  fallbacks: [{"llama-3.2-8b": ["gpt-4o"]}]
  redis_host: redis
litellm_settings:
  request_timeout: 600
  set_verbose: false
general_settings:
  master_key: sk-1234
"""


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_TEST_VLLM_KEY", "vllm-secret")
    monkeypatch.delenv("SYNAPSE_MASTER_KEY", raising=False)


def _router() -> tuple[Router, list[str]]:
    loaded = parse_config(LITELLM, "litellm.yaml")
    config = loaded.config
    backends = {n: Backend.from_config(n, b, config.timeouts) for n, b in config.backends.items()}
    return Router.from_config(config, backends), [w.render() for w in loaded.warnings]


def test_entries_with_one_name_are_deployments_of_one_model() -> None:
    router, _ = _router()
    resolution = router.lookup("llama-3.2-8b")
    assert resolution is not None
    assert [(t.backend.url, t.upstream_model) for t in resolution.targets] == [
        ("http://vllm:8000", "llama-3.2-8b"), ("http://vllm-2:8000", "meta-llama/Llama-3.2-8B")]
    first = resolution.targets[0].backend
    assert first.protocol == "vllm"
    assert first.headers["Authorization"] == "Bearer vllm-secret"
    assert first.timeouts.total == 120
    assert [(f.model, f.targets[0].upstream_model) for f in resolution.fallbacks] == [("gpt-4o", "gpt-4o")]


def test_prefix_and_catch_all_wildcards() -> None:
    router, _ = _router()
    prefixed = router.lookup("ollama/qwen2.5:7b")
    assert prefixed is not None and prefixed.targets[0].upstream_model == "qwen2.5:7b"
    assert prefixed.targets[0].backend.protocol == "ollama"
    assert prefixed.route == "ollama/*"
    anything = router.lookup("mistral:7b")
    assert anything is not None and anything.source == "pattern"
    assert anything.targets[0].upstream_model == "mistral:7b"
    assert anything.route == "*"


def test_openai_default_base_and_router_settings() -> None:
    loaded = parse_config(LITELLM, "litellm.yaml")
    config = loaded.config
    openai_backend = next(b for b in config.backends.values() if "api.openai.com" in b.url)
    assert openai_backend.url == "https://api.openai.com"
    assert (config.routing.retries, config.routing.allowed_fails, config.routing.cooldown) == (3, 2, 45)
    assert config.timeouts.total == 600


def test_unused_keys_are_warnings_with_lines() -> None:
    _, warnings = _router()
    joined = "\n".join(warnings)
    for key in ("model_info", "rpm", "redis_host", "set_verbose", "latency-based-routing"):
        assert key in joined
    assert "master_key" not in joined
    assert "litellm.yaml:9: warning: model_list.0.model_info" in joined
    assert any("anthropic/" in w and "skipped" in w for w in warnings)


def test_missing_environment_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNAPSE_TEST_VLLM_KEY")
    with pytest.raises(ConfigError) as caught:
        parse_config(LITELLM, "litellm.yaml")
    assert "litellm.yaml:7: error" in str(caught.value)


def test_an_entry_without_a_model_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("model_list:\n  - model_name: x\n    litellm_params: {api_base: 'http://h'}\n", "l.yaml")
    assert "l.yaml:3: error" in str(caught.value)


def test_the_master_key_becomes_the_gateways_key() -> None:
    text = """
model_list: [{model_name: "*", litellm_params: {model: "openai/*"}}]
general_settings: {master_key: sk-1234}
"""
    loaded = parse_config(text, "litellm.yaml")
    assert loaded.config.auth.master_key == "sk-1234"
    assert not any("master_key" in w.render() or "general_settings" in w.render() for w in loaded.warnings)


def test_the_master_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
model_list: [{model_name: m, litellm_params: {model: "openai/m", api_key: k}}]
general_settings: {master_key: os.environ/SYNAPSE_TEST_MASTER, alerting: [slack]}
"""
    monkeypatch.setenv("SYNAPSE_TEST_MASTER", "sk-from-env")
    loaded = parse_config(text, "litellm.yaml")
    assert loaded.config.auth.master_key == "sk-from-env"
    assert [w.render() for w in loaded.warnings] == [
        "litellm.yaml:3: warning: general_settings.alerting: `alerting` is kept but not used by Synapse yet"]
    monkeypatch.setenv("SYNAPSE_MASTER_KEY", "sk-override")
    assert parse_config(text, "litellm.yaml").config.auth.master_key == "sk-override"
    monkeypatch.delenv("SYNAPSE_MASTER_KEY")
    monkeypatch.delenv("SYNAPSE_TEST_MASTER")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "litellm.yaml")
    assert "litellm.yaml:3: error: general_settings.master_key: environment variable SYNAPSE_TEST_MASTER " \
           "is not set" in str(caught.value)


@pytest.mark.parametrize(("setting", "message"), [
    ("num_retries: null", "`num_retries` must be a whole number of 0 or more, not None"),
    ("num_retries: x", "`num_retries` must be a whole number of 0 or more, not 'x'"),
    ("num_retries: 1.5", "`num_retries` must be a whole number of 0 or more, not 1.5"),
    ("allowed_fails: 0", "`allowed_fails` must be a whole number of 1 or more, not 0"),
    ("cooldown_time: soon", "`cooldown_time` must be a number of seconds, 0 or more, not 'soon'"),
    ("timeout: [1]", "`timeout` must be a number of seconds, more than 0, not [1]"),
])
def test_wrong_router_settings_are_located_problems(setting: str, message: str) -> None:
    text = f"model_list: [{{model_name: m, litellm_params: {{model: openai/m, api_key: k}}}}]\n" \
           f"router_settings:\n  {setting}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "litellm.yaml")
    [problem] = caught.value.problems
    assert (problem.line, problem.severity, problem.message) == (3, "error", message)
    assert problem.fix.startswith("write e.g. `")


def test_router_settings_accept_quoted_numbers_and_cap_retries() -> None:
    text = """
model_list: [{model_name: m, litellm_params: {model: openai/m, api_key: k, timeout: "90"}}]
router_settings: {num_retries: "50", allowed_fails: "2", cooldown_time: 1.5, timeout: null}
"""
    loaded = parse_config(text, "litellm.yaml")
    routing = loaded.config.routing
    assert (routing.retries, routing.allowed_fails, routing.cooldown) == (10, 2, 1.5)
    assert next(iter(loaded.config.backends.values())).timeouts.total == 90
    assert loaded.config.timeouts.total is None
    assert [w.message for w in loaded.warnings] == ["num_retries 50 is capped at 10"]
