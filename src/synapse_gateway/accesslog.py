"""One structured (JSON) log line per request, and the JSON formatter for all of Synapse's logs."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import orjson

access_log = logging.getLogger("synapse.access")


@dataclass(slots=True)
class RequestRecord:
    """What one request did; filled in along the way and logged once at the end."""

    request_id: str
    method: str
    path: str
    started: float
    model: str | None = None
    route: str | None = None
    backend: str | None = None
    upstream_model: str | None = None
    status: int = 0
    first_byte: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    retries: int = 0
    stream: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started

    def emit(self, finished: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        ttft = self.ttft
        access_log.info("request", extra={"fields": {
            "request_id": self.request_id, "method": self.method, "path": self.path, "model": self.model,
            "route": self.route, "backend": self.backend, "upstream_model": self.upstream_model,
            "status": self.status, "latency_ms": round((finished - self.started) * 1000, 3),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3), "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "retries": self.retries, "stream": self.stream,
            "error": self.error,
        }})


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


def setup_logging(level: str, *, access: bool, json_lines: bool = True) -> None:
    """Send Synapse's logs to stderr, one JSON object per line (or plain text for a terminal)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("synapse")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    access_log.disabled = not access
