"""Runtime view of the configured backends: addresses, auth headers, timeouts and load counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from .config.schema import BackendConfig, LifecycleConfig, Timeouts

if TYPE_CHECKING:
    from .engines.process import ManagedEngine

_HEALTH_PATH = {"openai": "/v1/models", "vllm": "/health", "ollama": "/api/version"}


@dataclass(eq=False, slots=True)
class Backend:
    """One inference server and what the gateway currently knows about it."""

    name: str
    protocol: str
    url: str
    openai_base: str
    headers: dict[str, str]
    timeouts: Timeouts
    discover: bool
    health_path: str
    client_timeout: aiohttp.ClientTimeout
    static_models: tuple[str, ...] = ()
    in_flight: int = 0
    reachable: bool | None = None
    last_error: str | None = None
    discovered: frozenset[str] = field(default_factory=frozenset)
    engine: ManagedEngine | None = None
    lifecycle: LifecycleConfig | None = None

    def health_url(self, path: str | None = None) -> str:
        """An absolute health URL: `path` may be a full URL, a path on this backend, or None (the default)."""
        path = path or self.health_path
        return path if path.startswith(("http://", "https://")) else self.url + path

    @classmethod
    def from_config(cls, name: str, config: BackendConfig, default_timeouts: Timeouts) -> Backend:
        openai_base = config.url if config.url.endswith("/v1") else config.url + "/v1"
        root = config.url.removesuffix("/v1")
        headers = dict(config.headers)
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        timeouts = config.timeouts.over(default_timeouts)
        # sock_read bounds the wait for the response head and for any later read (so a non-streamed
        # answer gets first_byte to arrive); the relay bounds a stream's gaps by stream_idle as well.
        client_timeout = aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect,
                                               sock_read=timeouts.first_byte)
        return cls(
            name=name,
            protocol=config.protocol,
            url=root,
            openai_base=openai_base,
            headers=headers,
            timeouts=timeouts,
            discover=config.discover,
            health_path=config.health_path or _HEALTH_PATH[config.protocol],
            client_timeout=client_timeout,
            lifecycle=config.lifecycle,
            static_models=tuple(config.models),
        )

    def endpoint(self, api_path: str) -> str:
        """The upstream URL for an OpenAI path such as "/chat/completions"."""
        return self.openai_base + api_path
