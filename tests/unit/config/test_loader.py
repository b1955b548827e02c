"""The native format: defaults, units, ${ENV}, and problems located at a line with a fix."""

from __future__ import annotations

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
