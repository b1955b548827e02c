"""Runs a real Synapse gateway for tests: in a background thread (fast) or as a `synapse serve` process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import openai
import orjson

from synapse_gateway.app import create_app
from synapse_gateway.config import parse_config
from synapse_gateway.gateway import GATEWAY_KEY, Gateway
from synapse_gateway.web.serve import free_port, make_runner
from tests.fakes.server import BackgroundServer


class ThreadGateway:
    """The gateway app served on 127.0.0.1:<free port> from a thread, built from a config dict or text."""

    def __init__(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else orjson.dumps(config).decode()  # JSON is YAML
        self.loaded = parse_config(text, "<test config>")
        self.app = create_app(self.loaded)
        settings = self.loaded.config.server
        self.server = BackgroundServer(
            self.app, shutdown_timeout=settings.drain_timeout,
            make_runner=lambda app: make_runner(app, drain_timeout=settings.drain_timeout,
                                                header_timeout=settings.header_timeout))
        self.url = ""
        self._access = io.BytesIO()

    def start(self) -> ThreadGateway:
        self.url = self.server.start()
        self.gateway.access_log.stream = self._access = io.BytesIO()
        return self

    def access_lines(self, count: int = 1, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The access-log entries written so far, waiting until there are `count`.

        A stream's line is written just after its last byte, so a client can finish reading first.
        """
        deadline = time.monotonic() + timeout
        while True:
            async def flush() -> None:
                self.gateway.access_log.flush()

            self.server.call(flush)
            lines = [orjson.loads(line) for line in self._access.getvalue().splitlines()]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.stop()

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY_KEY]

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="test-key", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="test-key", max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> ThreadGateway:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ProcessGateway:
    """`synapse serve --config FILE` as a child process, for signals and the real command line."""

    def __init__(self, config_path: Path | None, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(extra_env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 20.0) -> ProcessGateway:
        config = ["--config", str(self.config_path)] if self.config_path else []
        command = [sys.executable, "-m", "synapse_gateway", "serve", *config,
                   "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"synapse exited with {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"synapse did not become ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
