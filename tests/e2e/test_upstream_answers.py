"""What a backend answers, and what the client gets: compressed, malformed, hostile or oversized answers."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory
from tests.fakes.server import BackgroundServer
from tests.gateway_harness import ThreadGateway

MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"object": "chat.completion", "id": "c1", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class Upstream:
    """A backend behind a misbehaving proxy: the requested model name picks the behaviour."""

    def __init__(self) -> None:
        self.seen_encodings: list[str] = []
        self.closed: list[str] = []
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.server = BackgroundServer(app)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        if model == "close-always" or (model == "close-once" and model not in self.closed):
            self.closed.append(model)  # shed like llama.cpp's server with a full queue: no answer at all
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        accepted = request.headers.get("Accept-Encoding", "")
        self.seen_encodings.append(accepted)
        if model == "gzip-if-asked" and "gzip" in accepted:  # nginx/Traefik/Cloudflare compression
            return _gzipped(CHAT)
        if model == "gzip-always":
            return _gzipped(CHAT)
        if model == "string-usage":
            return web.json_response({**CHAT, "usage": {"prompt_tokens": "12", "completion_tokens": -1}})
        if model == "html":
            return web.Response(text="<html>please log in</html>", content_type="text/html")
        if model == "unauthorized":
            return web.json_response({"error": {"message": "Incorrect API key provided: sk-abc***xyz",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=401)
        if model == "rate-limited":
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": "7"})
        if model == "plain-404":
            return web.Response(text="no such thing", status=404)
        if model == "huge":
            return web.Response(body=b'{"pad": "' + b"x" * 300_000 + b'"}', content_type="application/json")
        return web.json_response(CHAT)


def _gzipped(body: object) -> web.Response:
    return web.Response(body=gzip.compress(orjson.dumps(body)), content_type="application/json",
                        headers={"Content-Encoding": "gzip"})


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    fake = Upstream()
    fake.server.start()
    yield fake
    fake.server.stop()


def _gateway(start_gateway: GatewayFactory, upstream: Upstream, **server: object) -> ThreadGateway:
    return start_gateway({"server": server, "backends": {"u": {"url": upstream.server.url, "discover": False}},
                          "routes": [{"pattern": "*", "backend": "u"}], "routing": {"retries": 0}})


def test_the_gateway_asks_for_identity_so_compressing_proxies_send_plain_json(
        start_gateway: GatewayFactory, upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "gzip-if-asked", "messages": MESSAGES})
    assert answer.status_code == 200
    assert "content-encoding" not in answer.headers
    assert answer.json()["choices"][0]["message"]["content"] == "hello"
    assert upstream.seen_encodings == ["identity"]


def test_an_answer_compressed_anyway_keeps_its_content_encoding(start_gateway: GatewayFactory,
                                                                upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).client() as client:
        completion = client.chat.completions.create(model="gzip-always", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "hello"


def test_a_usage_that_is_not_a_count_is_ignored_not_a_500(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "string-usage", "messages": MESSAGES})
        assert answer.status_code == 200
        assert answer.json()["usage"]["prompt_tokens"] == "12", "the answer itself is relayed untouched"
        assert "synapse_tokens_total{" not in http.get("/metrics").text


def test_an_html_page_with_200_is_a_502(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "html", "messages": MESSAGES})
    assert answer.status_code == 502
    assert answer.json()["error"]["message"] == "backend u answered with an HTML page, not an API answer"


def test_a_backend_refusing_the_gateways_key_is_a_502_that_shows_no_key(start_gateway: GatewayFactory,
                                                                        upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "unauthorized", "messages": MESSAGES})
    assert answer.status_code == 502
    assert "sk-abc" not in answer.text
    assert "credentials" in answer.json()["error"]["message"]


def test_a_backend_429_keeps_its_status_and_retry_after(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "rate-limited", "messages": MESSAGES})
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "7"
    assert answer.json()["error"]["type"] == "rate_limit_error"


def test_a_4xx_without_an_envelope_keeps_its_status_in_the_gateways_envelope(start_gateway: GatewayFactory,
                                                                             upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream).http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "plain-404", "messages": MESSAGES})
    assert answer.status_code == 404
    assert answer.json()["error"] == {"message": "backend u answered HTTP 404: no such thing",
                                      "type": "invalid_request_error", "param": None, "code": "upstream_error"}


def test_a_non_streamed_answer_over_the_limit_is_a_502(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    with _gateway(start_gateway, upstream, max_response_size="100KiB").http() as http:
        answer = http.post("/v1/chat/completions", json={"model": "huge", "messages": MESSAGES})
        assert answer.status_code == 502
        assert "max_response_size" in answer.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={"model": "ok", "messages": MESSAGES}).status_code == 200


def test_a_connection_closed_without_an_answer_is_retried_once_on_the_same_deployment(
        start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = start_gateway({"backends": {"u": {"url": upstream.server.url, "discover": False}},
                        "routes": [{"pattern": "*", "backend": "u"}], "routing": {"retries": 3}})
    with gw.http() as http:
        once = http.post("/v1/chat/completions", json={"model": "close-once", "messages": MESSAGES})
        always = http.post("/v1/chat/completions", json={"model": "close-always", "messages": MESSAGES})
    assert once.status_code == 200
    assert always.status_code == 502
    assert always.json()["error"]["code"] == "backend_closed"
    assert upstream.closed == ["close-once", "close-always", "close-always"], "once more, not `retries` more"
