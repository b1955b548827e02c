"""Runs the audio engine: listen, serve, and on SIGTERM or SIGINT stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import create_audio_app
from .config import AudioEngineConfig

log = logging.getLogger("synapse.audio")


async def serve_audio(config: AudioEngineConfig, host: str, port: int, *, drain_timeout: float = 30.0) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, give in-flight requests `drain_timeout`, return."""
    runner = web.AppRunner(create_audio_app(config), access_log=None, handler_cancellation=True,
                           shutdown_timeout=drain_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound = next((a[1] for a in runner.addresses if isinstance(a, tuple)), port)
        log.info("audio engine listening on http://%s:%d (speech-to-text: %s; voices: %s)", host, bound,
                 ", ".join(config.stt_models) or "none", ", ".join(config.tts_voices) or "none")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("audio engine shutting down")
    finally:
        await runner.cleanup()
    log.info("audio engine stopped")


def run_audio_engine(config: AudioEngineConfig, host: str, port: int) -> None:
    """Run `serve_audio` (on uvloop where installed) until a signal stops it; returns normally."""
    from ..server import run_async

    run_async(serve_audio(config, host, port))
