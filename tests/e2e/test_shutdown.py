"""SIGTERM: readiness turns false, in-flight streams finish, new connections are refused, exit 0."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.fakes.vllm import FakeVLLM
from tests.gateway_harness import ProcessGateway

MESSAGES = [{"role": "user", "content": "Hello"}]


def test_sigterm_drains_in_flight_streams(tmp_path: Path) -> None:
    with FakeVLLM(["slow"], stream_chunks=15, chunk_delay=0.2, reply="{model} " + "word " * 14) as slow:
        config = tmp_path / "synapse.yaml"
        config.write_text(f"backends:\n  v:\n    url: {slow.url}\n"
                          "server:\n  shutdown_delay: 0.5\n  drain_timeout: 10\n")
        gateway = ProcessGateway(config, tmp_path / "synapse.log").start()
        try:
            result: dict[str, object] = {}

            def stream() -> None:
                with httpx.Client(base_url=gateway.url, timeout=10) as http:
                    answer = http.post("/v1/chat/completions",
                                       json={"model": "slow", "messages": MESSAGES, "stream": True})
                    result["status"] = answer.status_code
                    result["text"] = answer.text

            worker = threading.Thread(target=stream)
            worker.start()
            slow.wait_until(lambda: slow.in_flight == 1, timeout=5)
            gateway.terminate()
            time.sleep(0.2)
            with httpx.Client(base_url=gateway.url, timeout=2) as http:
                assert http.get("/health/ready").status_code == 503
            # After shutdown_delay the listener closes while the stream is still being relayed.
            deadline = time.monotonic() + 2.5
            refused_while_draining = False
            while time.monotonic() < deadline and worker.is_alive():
                try:
                    httpx.get(gateway.url + "/health/live", timeout=0.5, headers={"Connection": "close"})
                except httpx.TransportError:
                    refused_while_draining = worker.is_alive()
                    break
                time.sleep(0.05)
            assert refused_while_draining, "new connections must be refused while in-flight streams drain"
            worker.join(timeout=10)
            assert gateway.wait(timeout=10) == 0
            assert result["status"] == 200
            text = str(result["text"])
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
            assert '"error"' not in text
            assert "shutting down" in gateway.log()
        finally:
            gateway.stop()
