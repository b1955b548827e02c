"""Prometheus metrics and the one structured log line per request."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayFactory
from tests.fakes.vllm import FakeVLLM

MESSAGES = [{"role": "user", "content": "Hello"}]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_latency_ttft_and_in_flight(start_gateway: GatewayFactory,
                                                           vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}}})
    with gw.client() as client:
        client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES)
        list(client.chat.completions.create(model="llama-3.2-8b", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    with gw.http() as http:
        http.post("/v1/chat/completions", json={"model": "nobody-has-this", "messages": MESSAGES})
        deadline = time.monotonic() + 2
        while "synapse_time_to_first_token_seconds_count" not in (answer := http.get("/metrics")).text:
            assert time.monotonic() < deadline, "the stream was never counted"
            time.sleep(0.01)
    assert answer.headers["content-type"].startswith("text/plain")
    samples = _samples(answer.text)
    ok = ("synapse_requests_total", (("backend", "v"), ("model", "llama-3.2-8b"), ("status", "200")))
    assert samples[ok] == 2
    missing = ("synapse_requests_total", (("backend", "none"), ("model", "unknown"), ("status", "404")))
    assert samples[missing] == 1
    labels = (("backend", "v"), ("model", "llama-3.2-8b"))
    assert samples[("synapse_request_duration_seconds_count", labels)] == 2
    assert samples[("synapse_time_to_first_token_seconds_count", labels)] == 1
    assert samples[("synapse_requests_in_flight", (("backend", "v"),))] == 0
    assert samples[("synapse_backend_up", (("backend", "v"),))] == 1
    assert samples[("synapse_tokens_total", (("direction", "out"), ("model", "llama-3.2-8b")))] > 0


def test_one_access_log_line_per_request(start_gateway: GatewayFactory, vllm: FakeVLLM) -> None:
    gw = start_gateway({"backends": {"v": {"url": vllm.url}},
                        "routes": [{"model": "chat", "backend": "v", "upstream": "llama-3.2-8b"}]})
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    lines = gw.access_lines()
    assert len(lines) == 1
    fields = lines[0]
    assert fields["request_id"] == raw.headers["x-request-id"]
    usage = raw.parse().usage
    assert usage is not None
    assert {k: fields[k] for k in ("model", "source", "route", "backend", "upstream_model", "status", "retries",
                                   "tokens_in", "tokens_out")} == {
        "model": "chat", "source": "exact", "route": "chat", "backend": "v", "upstream_model": "llama-3.2-8b",
        "status": 200, "retries": 0, "tokens_in": usage.prompt_tokens, "tokens_out": usage.completion_tokens}
    assert fields["latency_ms"] > 0
