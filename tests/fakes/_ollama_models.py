"""The model store and load/unload bookkeeping of the fake Ollama (what /api/tags and /api/ps show)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

FOREVER = 292 * 365 * 86400.0  # Go's math.MaxInt64 nanoseconds, what a negative keep_alive means
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")


def full_name(name: str) -> str:
    """Ollama's canonical name: a missing tag means ':latest'."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).astimezone().isoformat()


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds to keep a model loaded, as Ollama reads ``keep_alive``; ValueError like Go's errors."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, str):
        value = _go_duration(value)
    return FOREVER if value < 0 else float(value)


def _go_duration(text: str) -> float:
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if body == "0":
        return 0.0
    parts = _GO_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)


@dataclass
class Loaded:
    """A model resident in (fake) VRAM."""

    size: int
    context_length: int
    expires_at: float
    refs: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class ModelStore:
    """Local models, the loaded set (LRU order) and the load/unload history."""

    def __init__(
        self,
        models: Sequence[str] | Mapping[str, int],
        *,
        embedding: Sequence[str],
        max_loaded: int,
        load_delay: float,
    ) -> None:
        sizes = models if isinstance(models, Mapping) else {m: 1_000_000_000 + 1_000 * i for i, m in enumerate(models)}
        sizes = {**sizes, **{m: 300_000_000 for m in embedding if m not in sizes}}
        self.sizes = {full_name(m): size for m, size in sizes.items()}
        self.embedding_models = {full_name(m) for m in embedding}
        self.max_loaded = max_loaded
        self.load_delay = load_delay
        self.context_length = 4096
        self.modified = time.time() - 86400
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()
        self.loads: list[str] = []
        self.unloads: list[str] = []

    def knows(self, name: str) -> bool:
        return full_name(name) in self.sizes

    def is_embedding(self, name: str) -> bool:
        return full_name(name) in self.embedding_models

    def details(self, name: str) -> dict[str, Any]:
        family = re.match(r"[a-z]+", name)
        fam = family.group() if family else "llama"
        tag = full_name(name).rsplit(":", 1)[1]
        size = tag.upper() if re.fullmatch(r"\d+(\.\d+)?[bm]", tag) else "3.2B"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": fam,
            "families": [fam],
            "parameter_size": size,
            "quantization_level": "Q4_K_M",
        }

    def tag(self, name: str) -> dict[str, Any]:
        """One /api/tags entry."""
        digest = hashlib.sha256(name.encode()).hexdigest()
        return {
            "name": name,
            "model": name,
            "modified_at": rfc3339(self.modified),
            "size": self.sizes[name],
            "digest": digest,
            "details": self.details(name),
        }

    def ps(self) -> list[dict[str, Any]]:
        """The /api/ps entries, least recently used first."""
        self.prune()
        out = []
        for name, entry in self.loaded.items():
            row = {k: v for k, v in self.tag(name).items() if k != "modified_at"}
            row |= {
                "expires_at": rfc3339(entry.expires_at),
                "size_vram": entry.size,
                "context_length": entry.context_length,
            }
            out.append(row)
        return out

    def resident(self) -> list[str]:
        """Loaded model names, LRU first; read-only, so safe to call from the test thread."""
        now = time.time()
        return [n for n, e in list(self.loaded.items()) if e.refs or e.expires_at > now]

    def prune(self) -> None:
        """Unload idle models whose keep_alive ran out."""
        now = time.time()
        for name, entry in list(self.loaded.items()):
            if entry.refs == 0 and entry.expires_at <= now:
                self.unload(name)

    def unload(self, name: str) -> None:
        if self.loaded.pop(full_name(name), None) is not None:
            self.unloads.append(full_name(name))

    async def acquire(self, name: str, *, keep_alive: float, num_ctx: Any = None) -> int:
        """Hold ``name`` loaded for one request (loading it, evicting LRU idle models); returns load ns."""
        self.prune()
        name, started = full_name(name), time.monotonic()
        await self._make_room(name)
        entry = self.loaded.get(name)
        if entry is None:
            ctx = num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else self.context_length
            entry = self.loaded[name] = Loaded(self.sizes[name], ctx, time.time() + keep_alive)
            self.loads.append(name)
            # The load completes even if the requester leaves, as Ollama's scheduler does.
            asyncio.get_running_loop().call_later(self.load_delay, entry.ready.set)
        entry.refs += 1
        self.loaded.move_to_end(name)
        try:
            await entry.ready.wait()
        except asyncio.CancelledError:
            entry.refs -= 1
            raise
        return math.ceil((time.monotonic() - started) * 1e9)

    def release(self, name: str, *, keep_alive: float) -> None:
        """A request on ``name`` finished: the keep_alive countdown starts now (0 unloads at once)."""
        entry = self.loaded.get(full_name(name))
        if entry is None:
            return
        entry.refs -= 1
        entry.expires_at = time.time() + keep_alive
        if keep_alive == 0 and entry.refs == 0:
            self.unload(name)

    async def _make_room(self, name: str) -> None:
        # Like Ollama's scheduler: evict the least recently used idle model, or wait for one.
        while name not in self.loaded and len(self.loaded) >= self.max_loaded:
            idle = next((n for n, e in self.loaded.items() if e.refs == 0), None)
            if idle is None:
                await asyncio.sleep(0.005)
            else:
                self.unload(idle)
