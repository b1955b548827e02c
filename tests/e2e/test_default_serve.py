"""`synapse serve` with no config: the embedded default, with Ollama as the discovered fallback."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import dead_url
from tests.fakes.ollama import FakeOllama
from tests.gateway_harness import ProcessGateway


def test_default_serves_ollamas_models(tmp_path: Path) -> None:
    with FakeOllama(["llama3.2:3b"]) as ollama:
        gateway = ProcessGateway(None, tmp_path / "log", {"OLLAMA_HOST": ollama.url}).start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=10) as http:
                ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
                chat = http.post("/v1/chat/completions",
                                 json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "Hi"}]})
        finally:
            gateway.stop()
    assert ids == ["llama3.2:3b"]
    assert chat.status_code == 200
    assert chat.headers["x-synapse-backend"] == "ollama"
    assert "backend ollama (ollama," in gateway.log() and "answers" in gateway.log()


def test_default_without_ollama_starts_and_says_how_to_add_backends(tmp_path: Path) -> None:
    gateway = ProcessGateway(None, tmp_path / "log", {"OLLAMA_HOST": dead_url()}).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            ready = http.get("/health/ready")
            chat = http.post("/v1/chat/completions",
                             json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        gateway.stop()
    assert ready.status_code == 200
    assert ready.json()["backends"]["ollama"]["reachable"] is False
    assert chat.status_code == 503
    assert chat.headers["retry-after"]
    log = gateway.log()
    assert "does not answer" in log
    assert "docs/config.md" in log
