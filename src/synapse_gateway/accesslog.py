"""One JSON line per request, written to a buffered byte stream, and the JSON formatter for other logs.

The access log bypasses the `logging` module: at thousands of requests per second its per-record
cost (record objects, locks, a flush per line) was a quarter of the gateway's CPU.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

_FLUSH_BYTES = 64 * 1024


@dataclass(slots=True)
class RequestRecord:
    """What one request did; filled in along the way and logged once at the end."""

    request_id: str
    method: str
    path: str
    started: float
    model: str | None = None
    source: str | None = None  # how the model was resolved: exact, alias, pattern, discovered, fallback
    route: str | None = None  # the route's name (a pattern's text, not the client's model): the metric label
    backend: str | None = None
    upstream_model: str | None = None
    status: int = 0
    first_byte: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    retries: int = 0
    stream: bool = False
    error: str | None = None
    key_id: str | None = None  # the virtual key's public id ("master" for the master key)
    hide_usage: bool = False  # the gateway asked a stream for its usage; the client did not
    characters: int | None = None  # text spoken (text-to-speech)
    audio_seconds: float | None = None  # audio heard (speech-to-text), when the engine says
    cost: float | None = None
    # The key's limits and what is left after this request, as OpenAI's x-ratelimit-* headers.
    rate: dict[str, str] | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started

    def fields(self, finished: float) -> dict[str, Any]:
        ttft = self.ttft
        return {
            "request_id": self.request_id, "method": self.method, "path": self.path, "model": self.model,
            "source": self.source, "route": self.route, "backend": self.backend, "upstream_model": self.upstream_model,
            "status": self.status, "latency_ms": round((finished - self.started) * 1000, 3),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3), "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "retries": self.retries, "stream": self.stream,
            "error": self.error, "key_id": self.key_id,
        }


class AccessLog:
    """Buffers access lines and writes them at most every `interval` seconds or every 64 KiB."""

    def __init__(self, stream: BinaryIO | None, *, interval: float = 0.2) -> None:
        self.stream = stream
        self.interval = interval
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def write(self, record: RequestRecord, finished: float) -> None:
        if self.stream is None:
            return
        entry = {"ts": self._timestamp(), "level": "info", "logger": "synapse.access", "msg": "request",
                 **record.fields(finished)}
        self._buffer += orjson.dumps(entry)
        self._buffer += b"\n"
        if len(self._buffer) >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer and self.stream is not None:
            self.stream.write(self._buffer)
            self.stream.flush()
            self._buffer.clear()

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object: time, level, logger, message, and any `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, *, json_lines: bool = True) -> None:
    """Send Synapse's logs to stderr, one JSON object per line (or plain text for a terminal)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("synapse")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
