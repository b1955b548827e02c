"""Resolution through the catalog: refresh on a miss (shared, rate-limited, remembered), fallbacks, listings,
and model listings of the wrong shape, against an in-memory stand-in for the HTTP session."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, cast

import aiohttp
import orjson
import pytest

from synapse_gateway.backends import Backend
from synapse_gateway.config import parse_config
from synapse_gateway.discovery import Catalog
from synapse_gateway.errors import InvalidRequest, ModelNotFound
from synapse_gateway.routing import Router

VLLM_MODELS = "http://vllm:8000/v1/models"
OLLAMA_TAGS = "http://ollama:11434/api/tags"
Answer = tuple[int, bytes] | BaseException


class _Response:
    def __init__(self, answer: Answer, delay: float) -> None:
        self.answer, self.delay = answer, delay
        self.status = answer[0] if isinstance(answer, tuple) else 0

    async def __aenter__(self) -> _Response:
        await asyncio.sleep(self.delay)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def read(self) -> bytes:
        assert isinstance(self.answer, tuple)
        return self.answer[1]


class Upstreams:
    """Answers the catalog's GETs from a table (URL -> status and body, or an exception) and counts them."""

    def __init__(self, delay: float = 0.0) -> None:
        self.answers: dict[str, Answer] = {}
        self.gets: list[str] = []
        self.delay = delay

    def serve(self, url: str, document: object, status: int = 200) -> None:
        self.answers[url] = (status, orjson.dumps(document))

    def get(self, url: str, **_: Any) -> _Response:
        self.gets.append(url)
        return _Response(self.answers.get(url, aiohttp.ClientConnectionError("connection refused")), self.delay)


def _catalog(config: dict[str, Any], upstreams: Upstreams) -> Catalog:
    config.setdefault("backends", {
        "vllm": {"url": "http://vllm:8000"}, "ollama": {"url": "http://ollama:11434", "protocol": "ollama"}})
    loaded = parse_config(orjson.dumps(config).decode())
    backends = {n: Backend.from_config(n, b, loaded.config.timeouts) for n, b in loaded.config.backends.items()}
    router = Router.from_config(loaded.config, backends)
    return Catalog(router, cast(aiohttp.ClientSession, upstreams), loaded.config.discovery)


def _no_gap(**extra: Any) -> dict[str, Any]:
    return {"discovery": {"min_refresh_gap": 0, "negative_ttl": 30}, **extra}


@pytest.fixture
def upstreams() -> Upstreams:
    served = Upstreams()
    served.serve(VLLM_MODELS, {"object": "list", "data": [{"id": "llama"}]})
    served.serve(OLLAMA_TAGS, {"models": [{"name": "qwen:7b"}]})
    return served


async def test_a_model_added_later_is_found_by_a_refresh_on_miss(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(), upstreams)
    await catalog.refresh()
    upstreams.serve(VLLM_MODELS, {"data": [{"id": "llama"}, {"id": "mistral"}]})
    resolution = await catalog.resolve("mistral")
    assert (resolution.source, resolution.route, resolution.targets[0].backend.name) == (
        "discovered", "mistral", "vllm")


async def test_an_unknown_model_is_not_found_and_remembered(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(), upstreams)
    await catalog.refresh()
    before = len(upstreams.gets)
    for _ in range(5):
        with pytest.raises(ModelNotFound) as caught:
            await catalog.resolve("nope")
        assert (caught.value.status, caught.value.param) == (404, "model")
    assert len(upstreams.gets) == before + 2  # one refresh (both backends) for five misses


async def test_an_unknown_model_goes_to_the_fallback_backend_after_a_refresh(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(fallback="ollama"), upstreams)
    await catalog.refresh()
    upstreams.serve(VLLM_MODELS, {"data": [{"id": "late"}]})
    assert (await catalog.resolve("late")).source == "discovered"
    elsewhere = await catalog.resolve("client-chosen/name")
    assert (elsewhere.source, elsewhere.route, elsewhere.targets[0].upstream_model) == (
        "fallback", "fallback:ollama", "client-chosen/name")


async def test_configured_names_resolve_without_asking_any_backend(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(routes=[
        {"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm", "fallbacks": ["small"]},
        {"model": "small", "backend": "ollama", "upstream": "qwen:7b"},
        {"pattern": "ollama/*", "backend": "ollama", "upstream": "*"}]), upstreams)
    alias = await catalog.resolve("gpt-4o")
    assert (alias.model, alias.source, alias.targets[0].upstream_model) == ("chat", "alias", "chat")
    assert [(f.model, f.targets[0].upstream_model) for f in alias.fallbacks] == [("small", "qwen:7b")]
    pattern = await catalog.resolve("ollama/phi3")
    assert (pattern.route, pattern.targets[0].upstream_model) == ("ollama/*", "phi3")
    assert upstreams.gets == []


async def test_an_overlong_name_is_refused_before_anything_is_asked_or_cached(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(fallback="ollama"), upstreams)
    with pytest.raises(InvalidRequest) as caught:
        await catalog.resolve("x" * 257)
    assert (caught.value.status, caught.value.param) == (400, "model")
    assert upstreams.gets == []
    assert await catalog.find_model("x" * 8_000_000) is None
    assert upstreams.gets == []
    assert (await catalog.resolve("x" * 256)).source == "fallback"


async def test_the_negative_cache_is_bounded_and_keeps_no_names(upstreams: Upstreams) -> None:
    catalog = _catalog({"discovery": {"min_refresh_gap": 3600, "negative_ttl": 3600}}, upstreams)
    await catalog.refresh()
    for n in range(5000):
        with pytest.raises(ModelNotFound):
            await catalog.resolve(f"{n:0>256}")
    misses = catalog._misses  # what the cache holds is the point of the test
    assert len(misses) == 4096
    assert all(len(key) == 16 for key in misses)


async def test_concurrent_misses_share_one_refresh() -> None:
    upstreams = Upstreams(delay=0.05)
    upstreams.serve(VLLM_MODELS, {"data": []})
    upstreams.serve(OLLAMA_TAGS, {"models": []})
    catalog = _catalog(_no_gap(), upstreams)
    outcomes = await asyncio.gather(*(catalog.resolve(f"m{n}") for n in range(20)), return_exceptions=True)
    assert all(isinstance(o, ModelNotFound) for o in outcomes)
    assert sorted(upstreams.gets) == [OLLAMA_TAGS, VLLM_MODELS]


async def test_misses_within_the_refresh_gap_do_not_refresh_again(upstreams: Upstreams) -> None:
    catalog = _catalog({"discovery": {"min_refresh_gap": 3600}}, upstreams)
    await catalog.refresh()
    before = len(upstreams.gets)
    for name in ("a", "b", "c"):
        with pytest.raises(ModelNotFound):
            await catalog.resolve(name)
    assert len(upstreams.gets) == before


async def test_listing_refreshes_when_nothing_was_discovered_yet(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(routes=[{"model": "chat", "aliases": ["gpt-4o"], "backend": "vllm"}]), upstreams)
    assert await catalog.public_models() == {"chat": "vllm", "gpt-4o": "vllm", "llama": "vllm", "qwen:7b": "ollama"}
    asked = len(upstreams.gets)
    await catalog.public_models()
    assert len(upstreams.gets) == asked  # something is discovered now: no refresh per listing


async def test_find_model_names_the_owner_and_refreshes_on_a_miss(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(routes=[{"pattern": "ollama/*", "backend": "ollama"}]), upstreams)
    await catalog.refresh()
    assert await catalog.find_model("qwen:7b") == "ollama"
    upstreams.serve(VLLM_MODELS, {"data": [{"id": "meta-llama/Llama-3.2-1B"}]})
    assert await catalog.find_model("meta-llama/Llama-3.2-1B") == "vllm"
    assert await catalog.find_model("ollama/matches-a-pattern-only") is None


@pytest.mark.parametrize(("document", "says"), [
    ([], "answered an array"),
    (None, "answered null"),
    (3, "answered a number"),
    ({"data": {"id": "x"}}, "answered a JSON object whose `data` is an object"),
    ({"object": "list"}, "answered a JSON object without `data`"),
])
async def test_a_listing_of_the_wrong_shape_is_a_probe_failure(upstreams: Upstreams, document: object,
                                                              says: str) -> None:
    upstreams.serve(VLLM_MODELS, document)
    catalog = _catalog(_no_gap(), upstreams)
    await catalog.start()
    await catalog.stop()
    vllm = catalog.router.backends["vllm"]
    assert vllm.reachable is False
    assert vllm.last_error == f"{VLLM_MODELS} {says}, expected a JSON object with a `data` list"
    assert catalog.router.backends["ollama"].reachable is True


async def test_a_listing_that_is_not_json_or_not_200_is_a_probe_failure(upstreams: Upstreams) -> None:
    upstreams.answers[VLLM_MODELS] = (200, b"<html>login</html>")
    upstreams.serve(OLLAMA_TAGS, {"error": "busy"}, status=503)
    catalog = _catalog(_no_gap(), upstreams)
    await catalog.refresh()
    backends = catalog.router.backends
    assert backends["vllm"].last_error == f"{VLLM_MODELS} did not answer JSON (expected a JSON object with a " \
                                          "`data` list)"
    assert backends["ollama"].last_error == f"{OLLAMA_TAGS} answered HTTP 503"


async def test_an_unexpected_probe_error_is_logged_with_its_traceback_and_not_raised(
        upstreams: Upstreams, caplog: pytest.LogCaptureFixture) -> None:
    upstreams.answers[VLLM_MODELS] = RuntimeError("surprise")
    catalog = _catalog(_no_gap(), upstreams)
    with caplog.at_level(logging.ERROR, logger="synapse.discovery"):
        await catalog.probe(catalog.router.backends["vllm"])
    assert catalog.router.backends["vllm"].last_error == "probe failed: surprise"
    assert any(r.exc_info and "vllm" in r.getMessage() for r in caplog.records)


async def test_a_backend_that_drops_a_model_stops_serving_it(upstreams: Upstreams) -> None:
    catalog = _catalog(_no_gap(), upstreams)
    await catalog.refresh()
    assert (await catalog.resolve("qwen:7b")).targets[0].backend.name == "ollama"
    upstreams.serve(OLLAMA_TAGS, {"models": [{"name": "other"}, {"name": 7}, "junk"]})
    await catalog.refresh()
    assert catalog.router.backends["ollama"].discovered == frozenset({"other"})
    with pytest.raises(ModelNotFound):
        await catalog.resolve("qwen:7b")
