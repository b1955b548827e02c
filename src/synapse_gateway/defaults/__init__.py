"""The embedded default configuration, used when no config file is given."""

from __future__ import annotations

import os
from importlib.resources import files
from urllib.parse import urlsplit

from ..config import LoadedConfig, parse_config

DEFAULT_SOURCE = "<embedded default>"


def ollama_url(env: dict[str, str] | None = None) -> str:
    """Ollama's address from OLLAMA_HOST as Ollama itself reads it ("host", "host:port" or a URL)."""
    value = (env if env is not None else os.environ).get("OLLAMA_HOST", "").strip()
    parts = urlsplit(value if "://" in value else f"http://{value or '127.0.0.1'}")
    host = parts.hostname or "127.0.0.1"
    if host in {"0.0.0.0", "::"}:  # a listen-anywhere address: talk to it locally
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{parts.port or 11434}"


def default_config() -> LoadedConfig:
    """The embedded default config, with Ollama's address filled in."""
    text = (files(__package__) / "default.yaml").read_text(encoding="utf-8")
    return parse_config(text.replace("{ollama_url}", ollama_url()), DEFAULT_SOURCE)
