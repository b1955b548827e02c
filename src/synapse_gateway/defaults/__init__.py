"""The embedded default configuration, used when no config file is given."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pydantic import ValidationError

from ..config import ConfigError, LoadedConfig, Problem, SynapseConfig

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
    """The embedded default: the local stack from packaged models, with a local Ollama as the fallback."""
    from ..localstack.stack import local_stack

    data, missing = local_stack(ollama_url())
    try:
        config = SynapseConfig.model_validate(data)
    except ValidationError as exc:  # a bug in the default, not the user's doing
        raise ConfigError([Problem("error", f"the embedded default is invalid: {exc}")]) from exc
    notes = [Problem("warning", line, file=DEFAULT_SOURCE) for line in missing]
    return LoadedConfig(config=config, source=DEFAULT_SOURCE, dialect="native", warnings=notes)
