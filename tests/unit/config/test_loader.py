"""The native format: defaults, units, ${ENV}, and problems located at a line with a fix."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from synapse_gateway.config import ConfigError, check_file, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.yaml")
    return [p.render() for p in caught.value.problems if p.severity == "error"]


def test_empty_config_is_valid_with_defaults() -> None:
    config = parse_config("", "empty.yaml").config
    assert config.server.max_body_size == 32 * 1024 * 1024
    assert config.timeouts.first_byte >= 300, "the first-byte default must allow a loading model"
    assert config.routing.retries == 2
    assert config.fallback is None


def test_units_and_env_substitution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_HOST", "gpu-box")
    text = """
server: {max_body_size: 25MB, drain_timeout: 1m}
timeouts: {first_byte: 30m, connect: 500ms}
backends:
  vllm:
    url: http://${VLLM_HOST}:8000
    api_key: ${MISSING_KEY:-none-needed}
"""
    config = parse_config(text).config
    assert config.server.max_body_size == 25_000_000
    assert config.server.drain_timeout == 60
    assert config.timeouts.first_byte == 1800
    assert config.timeouts.connect == 0.5
    assert config.backends["vllm"].url == "http://gpu-box:8000"
    assert config.backends["vllm"].api_key == "none-needed"


def test_missing_env_var_is_an_error_at_its_line() -> None:
    errors = _errors("backends:\n  v:\n    url: http://h:1\n    api_key: ${SYNAPSE_TEST_UNSET_VAR}\n")
    assert errors == ["test.yaml:4: error: backends.v.api_key: environment variable SYNAPSE_TEST_UNSET_VAR "
                      "is not set\n    fix: export SYNAPSE_TEST_UNSET_VAR=... or write "
                      "${SYNAPSE_TEST_UNSET_VAR:-default}"]


def test_every_problem_is_reported_with_line_and_fix() -> None:
    text = """backends:
  vllm:
    url: localhost:8000
    protocl: openai
routes:
  - model: a
    backend: nope
  - model: b
fallback: ollama
timeouts:
  connect: 5 parsecs
"""
    errors = _errors(text)
    assert len(errors) == 6
    lines = [e.split(":")[1] for e in errors]
    assert lines == ["3", "4", "7", "8", "9", "11"]
    assert any("did you mean `protocol`?" in e for e in errors)
    assert all("\n    fix: " in e for e in errors)


def test_yaml_syntax_error_names_the_line() -> None:
    errors = _errors("backends:\n  v:\n    url: [unclosed\n")
    assert errors[0].startswith("test.yaml:")
    assert "not valid YAML" in errors[0]


def test_a_public_name_used_twice_is_an_error() -> None:
    text = """backends: {v: {url: "http://h:1"}}
routes:
  - {model: chat, backend: v}
  - {model: other, aliases: [chat], backend: v}
"""
    assert any("already used by routes[0]" in e for e in _errors(text))


def test_route_shape_errors_explain_the_fix() -> None:
    errors = _errors("backends: {v: {url: 'http://h:1'}}\nroutes:\n  - {model: a, pattern: 'b*', backend: v}\n")
    assert "exactly one of `model` or `pattern`" in errors[0]


def test_examples_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "k")
    for path in sorted(EXAMPLES.glob("*.yaml")):
        problems = [p for p in check_file(path) if p.severity == "error"]
        assert problems == [], path


def test_seed_cluster_example_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "k")
    config = load_config(EXAMPLES / "seed-cluster.yaml").config
    assert config.backends["vllm-inference"].models == ["llama-3.2-8b"]
    assert config.fallback == "ollama"
    assert config.timeouts.first_byte == 1800


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    problems = check_file(tmp_path / "missing.yaml")
    assert problems[0].severity == "error" and "cannot read" in problems[0].message


# -- lifecycle: one model per driver --------------------------------------------------------
GPU = "gpu: {memory: 10GiB}\nbackends:\n  v:\n    url: http://h:1\n    lifecycle:\n"


def test_each_driver_gets_its_own_model() -> None:
    from synapse_gateway.config.schema import KubernetesLifecycle, OllamaLifecycle, VllmSleepLifecycle

    text = """gpu: {memory: 30GiB}
backends:
  v: {url: "http://h:1", lifecycle: {driver: vllm-sleep, memory: 6GiB, sleep_level: 2}}
  o: {url: "http://h:2", protocol: ollama, lifecycle: {driver: ollama, memory: 5GiB, model_memory: {phi3: 2GiB}}}
  k: {url: "http://h:3", lifecycle: {driver: kubernetes, memory: 6GiB, namespace: llm, deployment: tts}}
"""
    backends = parse_config(text).config.backends
    v, o, k = (backends[n].lifecycle for n in "vok")
    assert isinstance(v, VllmSleepLifecycle) and v.sleep_level == 2 and v.canary
    assert isinstance(o, OllamaLifecycle) and o.model_memory == {"phi3": 2 * 2**30}
    assert isinstance(k, KubernetesLifecycle) and (k.namespace, k.deployment) == ("llm", "tts")


def test_a_field_of_another_driver_names_its_driver_and_line() -> None:
    errors = _errors(GPU + "      driver: vllm-sleep\n      memory: 6GiB\n      namespace: llm\n")
    assert errors == ["test.yaml:8: error: backends.v.lifecycle.namespace: `namespace` is not a setting of the "
                      "vllm-sleep driver\n    fix: it belongs to the kubernetes driver: remove it, or set "
                      "`driver: kubernetes`"]


def test_a_misspelt_driver_field_suggests_the_drivers_own() -> None:
    errors = _errors(GPU + "      driver: vllm-sleep\n      memory: 6GiB\n      sleep_levle: 2\n")
    assert errors == ["test.yaml:8: error: backends.v.lifecycle.sleep_levle: unknown key `sleep_levle`\n"
                      "    fix: did you mean `sleep_level`?"]


def test_an_unknown_or_missing_driver_is_located() -> None:
    [unknown] = _errors(GPU + "      driver: vllm\n      memory: 6GiB\n")
    assert unknown.startswith("test.yaml:6: error: backends.v.lifecycle.driver: unknown driver 'vllm'")
    assert "did you mean `vllm-sleep`?" in unknown
    [missing] = _errors(GPU + "      memory: 6GiB\n")
    assert "`driver` is required" in missing and "vllm-sleep, ollama, kubernetes, process, always-on" in missing


def test_the_kubernetes_driver_needs_a_deployment() -> None:
    [error] = _errors(GPU + "      driver: kubernetes\n      memory: 6GiB\n")
    assert error.startswith("test.yaml:5: error: backends.v.lifecycle.deployment: the kubernetes driver needs "
                            "`deployment`")


# -- F6: a unit that can never wake is refused ------------------------------------------------
def test_always_on_units_that_leave_no_room_for_another_are_refused() -> None:
    text = """gpu: {memory: 10GiB}
backends:
  ao:
    url: http://h:1
    lifecycle: {driver: always-on, memory: 6GiB}
  vl:
    url: http://h:2
    lifecycle:
      driver: vllm-sleep
      memory: 6GiB
"""
    [error] = _errors(text)
    assert error.startswith("test.yaml:10: error: backends.vl.lifecycle.memory: can never wake: it needs 6.0 GiB, "
                            "and device gpu0 (10.0 GiB after its reserve) always holds ao 6.0 GiB")
    assert "fix: lower `memory` here or on the always-on backends" in error


def test_what_asleep_units_keep_counts_too() -> None:
    fits = """gpu: {memory: 10GiB}
backends:
  a: {url: "http://h:1", lifecycle: {driver: vllm-sleep, memory: 6GiB, sleeping_memory: 2GiB}}
  b: {url: "http://h:2", lifecycle: {driver: vllm-sleep, memory: 6GiB, sleeping_memory: 2GiB}}
"""
    assert parse_config(fits).config.gpu is not None  # 2 asleep + 6 awake = 8 of 10
    crowded = fits + "  c: {url: 'http://h:3', lifecycle: {driver: always-on, memory: 3GiB}}\n"
    errors = _errors(crowded)
    assert len(errors) == 2 and all("can never wake" in e for e in errors)
    assert "always holds c 3.0 GiB, b 2.0 GiB asleep" in errors[0]


def test_one_ollama_model_at_a_time_is_enough() -> None:
    text = """gpu: {memory: 10GiB}
backends:
  ao: {url: "http://h:1", lifecycle: {driver: always-on, memory: 4GiB}}
  o: {url: "http://h:2", protocol: ollama, lifecycle: {driver: ollama, memory: 5GiB, model_memory: {big: 7GiB}}}
"""
    [error] = _errors(text)
    assert "backends.o.lifecycle.memory: can never wake: it needs 7.0 GiB" in error


# -- several replicas (issue item 6) --------------------------------------------------------
def test_a_managed_engine_with_redis_is_refused_with_a_fix() -> None:
    text = """gpu: {memory: 16GiB, redis_url: "redis://redis:6379/0"}
backends:
  tts:
    url: http://127.0.0.1:8300
    managed: {command: [synapse, engine, audio]}
    lifecycle: {driver: process, memory: 12GiB}
"""
    [error] = _errors(text)
    assert error.startswith("test.yaml:6: error: backends.tts.lifecycle.driver: a `managed` engine cannot share the "
                            "GPU budget across replicas (`gpu.redis_url` is set): each replica would start its own "
                            "copy of this engine")
    assert "fix: run the engine as its own service" in error and "`driver: kubernetes`" in error
    assert "run one gateway replica without `redis_url`" in error
    assert parse_config(text.replace(', redis_url: "redis://redis:6379/0"', "")).config.gpu is not None


def test_the_seed_box_example_is_valid_with_and_without_redis() -> None:
    text = (EXAMPLES / "seed-box-gpu.yaml").read_text()
    assert "  # redis_url: " in text
    alone = parse_config(text, "seed-box-gpu.yaml").config
    replicas = parse_config(text.replace("  # redis_url: ", "  redis_url: "), "seed-box-gpu.yaml").config
    assert alone.gpu is not None and alone.gpu.redis_url is None
    assert replicas.gpu is not None and replicas.gpu.redis_url == "redis://redis.llm-infra.svc.cluster.local:6379/0"


# -- F22 and YAML aliases -------------------------------------------------------------------
@pytest.mark.parametrize("value", ["null", '"x"', "[1]"])
def test_a_litellm_setting_of_the_wrong_type_is_a_problem_not_a_traceback(value: str) -> None:
    text = ("model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, api_base: 'http://h:1'}\n"
            f"router_settings:\n  num_retries: {value}\n")
    assert _errors(text)


def test_a_yaml_alias_bomb_is_refused_quickly() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    started = time.monotonic()
    errors = _errors("\n".join(lines) + "\n")
    assert time.monotonic() - started < 2
    assert len(errors) == 1 and "expands to more than 100000 values" in errors[0]
    assert "fewer YAML anchors and aliases" in errors[0]


def test_a_few_aliases_are_fine() -> None:
    text = """backends:
  a: {url: "http://h:1", timeouts: &t {connect: 2s}}
  b: {url: "http://h:2", timeouts: *t}
"""
    assert parse_config(text).config.backends["b"].timeouts.connect == 2
