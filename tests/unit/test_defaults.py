"""The embedded default: Ollama at OLLAMA_HOST (as Ollama reads it) is the discovered fallback."""

from __future__ import annotations

import pytest

from synapse_gateway.defaults import default_config, ollama_url


@pytest.mark.parametrize(("value", "url"), [
    ("", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("gpu-box:11500", "http://gpu-box:11500"),
    ("https://ollama.example.org", "https://ollama.example.org:11434"),
    ("[::1]:9999", "http://[::1]:9999"),
])
def test_ollama_host_forms(value: str, url: str) -> None:
    assert ollama_url({"OLLAMA_HOST": value}) == url


def test_default_config_uses_ollama_as_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:12345")
    config = default_config().config
    assert config.fallback == "ollama"
    assert config.backends["ollama"].url == "http://127.0.0.1:12345"
    assert config.backends["ollama"].protocol == "ollama"
