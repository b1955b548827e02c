"""The audio engine's state: configured models by name and alias, worker threads, the idle reaper."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from ..errors import InvalidRequest, ModelNotFound
from .config import AudioEngineConfig
from .resident import Resident
from .stt import Whisper, load_whisper
from .tts import Voice, load_piper

R = TypeVar("R")
log = logging.getLogger("synapse.audio")


class AudioEngine:
    """Looks models up, runs inference in a bounded thread pool, and unloads what stays idle."""

    def __init__(self, config: AudioEngineConfig) -> None:
        self.config = config
        self.whispers = {name: Resident("stt", name, partial(load_whisper, entry))
                         for name, entry in config.stt_models.items()}
        self.voices = {name: Resident("tts", name, partial(load_piper, entry))
                       for name, entry in config.tts_voices.items()}
        self._stt_names = _names(config.stt_models.items())
        self._voice_names = _names(config.tts_voices.items())
        self._tts_models = set(config.tts_models) if config.tts_voices else set()
        self.executor = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="synapse-audio")
        self.started_at = time.time()

    def whisper(self, model: str) -> Resident[Whisper]:
        """The Whisper model called `model` (a name or an alias); 404 model_not_found otherwise."""
        name = self._stt_names.get(model)
        if name is None:
            raise ModelNotFound(model)
        return self.whispers[name]

    def voice(self, model: str, voice: str) -> Resident[Voice]:
        """The Piper voice called `voice` for speech model `model`; 404 for the model, 400 for the voice."""
        if model not in self._tts_models:
            raise ModelNotFound(model)
        name = self._voice_names.get(voice)
        if name is None:
            raise InvalidRequest(f"unknown voice {voice!r}; the available voices are "
                                 f"{', '.join(sorted(self._voice_names))}", param="voice", code="invalid_voice")
        return self.voices[name]

    def model_ids(self) -> list[str]:
        """Every model name /v1/models lists: Whisper names and aliases, then the speech model names."""
        return sorted(self._stt_names) + sorted(self._tts_models)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Await `fn(*args)` run on an inference thread (at most `max_concurrency` run at once)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def unload_idle(self) -> int:
        """Unload every model idle for `idle_unload` seconds; the number unloaded."""
        now = time.monotonic()
        residents: list[Resident[Any]] = [*self.whispers.values(), *self.voices.values()]
        return sum(r.unload_if_idle(self.config.idle_unload, now) for r in residents)

    async def reap_forever(self) -> None:
        """Check for idle models a few times per `idle_unload` (at least every 30 s)."""
        interval = min(max(self.config.idle_unload / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            if self.unload_idle():
                await asyncio.to_thread(_release_memory)

    def health(self) -> dict[str, Any]:
        """What GET /health answers: each model's state and idle time."""
        return {"status": "ok", "uptime_s": round(time.time() - self.started_at, 3),
                "idle_unload_s": self.config.idle_unload,
                "stt": {name: r.status() for name, r in self.whispers.items()},
                "tts": {name: r.status() for name, r in self.voices.items()}}

    def close(self) -> None:
        """Stop the inference threads; queued work is dropped."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _release_memory() -> None:
    """Collect what reference cycles still hold and hand freed heap back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _names(entries: Iterable[tuple[str, Any]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for name, entry in entries:
        names[name] = name
        names.update(dict.fromkeys(entry.aliases, name))
    return names


ENGINE_KEY = web.AppKey("audio_engine", AudioEngine)


def engine_lifespan(config: AudioEngineConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context that builds the engine when the app starts and stops it at the end."""

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        """Build the engine and start the reaper; on shutdown stop both."""
        engine = AudioEngine(config)
        app[ENGINE_KEY] = engine
        reaper = asyncio.create_task(engine.reap_forever(), name="audio idle reaper") if config.idle_unload else None
        try:
            yield
        finally:
            if reaper is not None:
                reaper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reaper
            engine.close()

    return lifespan
