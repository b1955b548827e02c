"""The gateway's master key: written in the config, from the environment, or set by SYNAPSE_MASTER_KEY."""

from __future__ import annotations

import pytest

from synapse_gateway.config import ConfigError, parse_config


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNAPSE_MASTER_KEY", raising=False)


def test_without_a_key_there_is_none() -> None:
    assert parse_config("backends: {}").config.auth.master_key is None


@pytest.mark.parametrize("written", ["sk-native", "${SYNAPSE_TEST_KEY}", "os.environ/SYNAPSE_TEST_KEY"])
def test_the_key_is_read_as_written_or_from_the_environment(monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    monkeypatch.setenv("SYNAPSE_TEST_KEY", "sk-native")
    assert parse_config(f"auth: {{master_key: '{written}'}}").config.auth.master_key == "sk-native"


def test_synapse_master_key_sets_or_replaces_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_MASTER_KEY", "sk-env")
    assert parse_config("backends: {}").config.auth.master_key == "sk-env"
    assert parse_config("auth: {master_key: sk-file}").config.auth.master_key == "sk-env"


def test_a_missing_variable_or_an_empty_key_is_a_located_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("auth:\n  master_key: os.environ/SYNAPSE_TEST_UNSET\n", "c.yaml")
    [problem] = caught.value.problems
    assert (problem.line, problem.message) == (2, "environment variable SYNAPSE_TEST_UNSET is not set")
    assert problem.fix == "export SYNAPSE_TEST_UNSET=... (or SYNAPSE_MASTER_KEY=...)"
    with pytest.raises(ConfigError) as caught:
        parse_config("auth:\n  master_key: ''\n", "c.yaml")
    assert "c.yaml:2: error: auth.master_key: `master_key` is empty" in str(caught.value)
