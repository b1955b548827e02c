"""Resolution order: exact, alias, pattern (most specific first), discovered, fallback."""

from __future__ import annotations

from typing import Any

import orjson

from synapse_gateway.backends import Backend
from synapse_gateway.config import parse_config
from synapse_gateway.routing import Router


def _router(config: dict[str, Any]) -> Router:
    loaded = parse_config(orjson.dumps(config).decode())
    backends = {n: Backend.from_config(n, b, loaded.config.timeouts) for n, b in loaded.config.backends.items()}
    return Router.from_config(loaded.config, backends)


BACKENDS = {"vllm": {"url": "http://vllm:8000"}, "ollama": {"url": "http://ollama:11434", "protocol": "ollama"}}


def test_order_exact_alias_pattern_discovered_fallback() -> None:
    router = _router({
        "backends": BACKENDS,
        "routes": [{"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm", "upstream": "llama"},
                   {"pattern": "qwen*", "backend": "ollama"}],
        "fallback": "ollama",
    })
    router.set_discovered(router.backends["vllm"], frozenset({"qwen-special", "mistral"}))
    cases = {"chat": ("exact", "vllm", "llama"), "gpt-4o": ("alias", "vllm", "llama"),
             "qwen-special": ("pattern", "ollama", "qwen-special"), "mistral": ("discovered", "vllm", "mistral"),
             "unknown": ("fallback", "ollama", "unknown")}
    for name, (source, backend, upstream) in cases.items():
        resolution = router.resolve(name)
        assert resolution is not None
        target = resolution.targets[0]
        assert (resolution.source, target.backend.name, target.upstream_model) == (source, backend, upstream)
    assert router.resolve("unknown", use_fallback=False) is None


def test_most_specific_pattern_wins_and_captures_the_wildcard() -> None:
    router = _router({"backends": BACKENDS, "routes": [
        {"pattern": "*", "backend": "ollama"},
        {"pattern": "hf/*/instruct", "backend": "vllm", "upstream": "org/*"},
    ]})
    resolution = router.resolve("hf/llama/instruct")
    assert resolution is not None
    assert resolution.targets[0].backend.name == "vllm"
    assert resolution.targets[0].upstream_model == "org/llama"
    other = router.resolve("anything")
    assert other is not None and other.targets[0].backend.name == "ollama"


def test_backend_model_lists_become_deployments_of_one_model() -> None:
    router = _router({"backends": {
        "a": {"url": "http://a:1", "models": ["llama"]}, "b": {"url": "http://b:1", "models": ["llama"]}}})
    resolution = router.resolve("llama", use_fallback=False)
    assert resolution is not None
    assert [t.backend.name for t in resolution.targets] == ["a", "b"]


def test_rediscovery_keeps_the_state_of_known_deployments() -> None:
    router = _router({"backends": BACKENDS})
    vllm = router.backends["vllm"]
    router.set_discovered(vllm, frozenset({"m"}))
    deployment = router.discovered["m"][0]
    deployment.cooldown_until = 123.0
    router.set_discovered(vllm, frozenset({"m", "n"}))
    assert router.discovered["m"][0] is deployment
    router.set_discovered(vllm, frozenset({"n"}))
    assert "m" not in router.discovered


def test_public_models_are_deduplicated() -> None:
    router = _router({"backends": BACKENDS, "routes": [{"model": "m", "backend": "vllm"}]})
    router.set_discovered(router.backends["vllm"], frozenset({"m", "x"}))
    router.set_discovered(router.backends["ollama"], frozenset({"x"}))
    assert router.public_models() == {"m": "vllm", "x": "vllm"}
