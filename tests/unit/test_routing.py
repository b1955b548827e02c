"""The routing table: exact, alias, pattern (most specific first), discovered, fallback, and fallback chains."""

from __future__ import annotations

from typing import Any

import orjson

from synapse_gateway.backends import Backend
from synapse_gateway.config import parse_config
from synapse_gateway.routing import Resolution, Router


def _router(config: dict[str, Any]) -> Router:
    loaded = parse_config(orjson.dumps(config).decode())
    backends = {n: Backend.from_config(n, b, loaded.config.timeouts) for n, b in loaded.config.backends.items()}
    return Router.from_config(loaded.config, backends)


def _found(router: Router, model: str, *, use_fallback: bool = True) -> Resolution:
    resolution = router.lookup(model, use_fallback=use_fallback)
    assert resolution is not None, model
    return resolution


def _where(resolution: Resolution) -> list[tuple[str, str]]:
    return [(t.backend.name, t.upstream_model) for t in resolution.targets]


BACKENDS = {"vllm": {"url": "http://vllm:8000"}, "ollama": {"url": "http://ollama:11434", "protocol": "ollama"}}


def test_order_exact_alias_pattern_discovered_fallback() -> None:
    router = _router({
        "backends": BACKENDS,
        "routes": [{"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm", "upstream": "llama"},
                   {"pattern": "qwen*", "backend": "ollama"}],
        "fallback": "ollama",
    })
    router.set_discovered(router.backends["vllm"], frozenset({"qwen-special", "mistral", "chat"}))
    cases = {"chat": ("exact", "vllm", "llama"), "gpt-4o": ("alias", "vllm", "llama"),
             "qwen-special": ("pattern", "ollama", "qwen-special"), "mistral": ("discovered", "vllm", "mistral"),
             "unknown": ("fallback", "ollama", "unknown")}
    for name, (source, backend, upstream) in cases.items():
        resolution = _found(router, name)
        assert (resolution.source, *_where(resolution)[0]) == (source, backend, upstream), name
    assert router.lookup("unknown", use_fallback=False) is None


def test_each_source_has_a_bounded_metric_label() -> None:
    router = _router({
        "backends": BACKENDS,
        "routes": [{"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm"},
                   {"pattern": "ollama/*", "backend": "ollama", "upstream": "*"}],
        "fallback": "ollama",
    })
    router.set_discovered(router.backends["vllm"], frozenset({"mistral"}))
    labels = {name: _found(router, name).route for name in
              ("chat", "gpt-4o", "ollama/any-client-string-1", "mistral", "any-client-string-2")}
    assert labels == {"chat": "chat", "gpt-4o": "chat", "ollama/any-client-string-1": "ollama/*",
                      "mistral": "mistral", "any-client-string-2": "fallback:ollama"}


def test_an_alias_without_upstream_is_sent_as_the_routes_model() -> None:
    router = _router({"backends": BACKENDS, "routes": [
        {"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm"},
        {"model": "embed", "aliases": ["text-embedding-3-small"],
         "deployments": [{"backend": "vllm"}, {"backend": "ollama", "model": "nomic-embed-text"}]},
    ]})
    chat = _found(router, "gpt-4o")
    assert (chat.model, chat.source, _where(chat)) == ("chat", "alias", [("vllm", "chat")])
    embed = _found(router, "text-embedding-3-small")
    assert _where(embed) == [("vllm", "embed"), ("ollama", "nomic-embed-text")]


def test_most_specific_pattern_wins_and_captures_the_wildcard() -> None:
    router = _router({"backends": BACKENDS, "routes": [
        {"pattern": "*", "backend": "ollama"},
        {"pattern": "hf/*/instruct", "backend": "vllm", "upstream": "org/*"},
    ]})
    resolution = _found(router, "hf/llama/instruct")
    assert _where(resolution) == [("vllm", "org/llama")]
    assert resolution.route == "hf/*/instruct"
    assert _where(_found(router, "anything")) == [("ollama", "anything")]


def test_backend_model_lists_become_deployments_of_one_model() -> None:
    router = _router({"backends": {
        "a": {"url": "http://a:1", "models": ["llama"]}, "b": {"url": "http://b:1", "models": ["llama"]}}})
    assert [name for name, _ in _where(_found(router, "llama", use_fallback=False))] == ["a", "b"]


def test_fallback_models_are_resolved_in_order_without_loops() -> None:
    router = _router({"backends": BACKENDS, "routes": [
        {"model": "big", "aliases": ["large"], "backend": "vllm", "fallbacks": ["medium", "large", "tiny"]},
        {"model": "medium", "backend": "vllm", "upstream": "m-7b", "fallbacks": ["small", "big"]},
        {"model": "small", "backend": "ollama", "fallbacks": ["medium"]},
        {"pattern": "t*", "backend": "ollama"},
    ]})
    big = _found(router, "big")
    # Its own list first ("large" is big itself, skipped), then the fallbacks' fallbacks, each model once.
    assert [(f.model, f.source, f.route) for f in big.fallbacks] == [
        ("medium", "exact", "medium"), ("tiny", "pattern", "t*"), ("small", "exact", "small")]
    assert _where(big.fallbacks[0]) == [("vllm", "m-7b")]
    assert all(f.fallbacks == () for f in big.fallbacks)
    assert [f.model for f in _found(router, "small").fallbacks] == ["medium", "big", "tiny"]


def test_an_unknown_fallback_model_goes_to_the_fallback_backend_or_is_skipped() -> None:
    routes = [{"model": "big", "backend": "vllm", "fallbacks": ["gone", "small"]},
              {"model": "small", "backend": "vllm"}]
    without = _router({"backends": BACKENDS, "routes": routes})
    assert [f.model for f in _found(without, "big").fallbacks] == ["small"]
    with_backend = _router({"backends": BACKENDS, "routes": routes, "fallback": "ollama"})
    fallbacks = _found(with_backend, "big").fallbacks
    assert [(f.model, f.source, f.route) for f in fallbacks] == [
        ("gone", "fallback", "fallback:ollama"), ("small", "exact", "small")]


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
