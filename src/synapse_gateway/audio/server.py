"""Runs the audio engine: listen, serve, and on SIGTERM or SIGINT stop cleanly."""

from __future__ import annotations

import logging

from ..web.serve import make_runner, run_async, serve_until_signal
from .app import create_audio_app
from .config import AudioEngineConfig

log = logging.getLogger("synapse.audio")


async def serve_audio(config: AudioEngineConfig, host: str, port: int, *, drain_timeout: float = 30.0) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, give in-flight requests `drain_timeout`, return."""
    runner = make_runner(create_audio_app(config), drain_timeout=drain_timeout)

    def listening(bound: int) -> None:
        log.info("audio engine listening on http://%s:%d (speech-to-text: %s; voices: %s)", host, bound,
                 ", ".join(config.stt_models) or "none", ", ".join(config.tts_voices) or "none")

    async def stopping() -> None:
        log.info("audio engine shutting down")

    await serve_until_signal(runner, host, port, on_listening=listening, before_stop=stopping)
    log.info("audio engine stopped")


def run_audio_engine(config: AudioEngineConfig, host: str, port: int) -> None:
    """Run `serve_audio` (on uvloop where installed) until a signal stops it; returns normally."""
    run_async(serve_audio(config, host, port))
