"""Builds the audio engine's aiohttp application: the route table over the shared error layer."""

from __future__ import annotations

from aiohttp import web

from ..web.errors import add_fallback_routes, rendering_errors, stamp_request_id
from .config import AudioEngineConfig
from .engine import engine_lifespan
from .forms import JSON_BODY_LIMIT
from .handlers import AudioApi


def create_audio_app(config: AudioEngineConfig) -> web.Application:
    """The OpenAI audio API over the configured Whisper models and Piper voices; models load on first use."""
    app = web.Application(client_max_size=JSON_BODY_LIMIT)
    app.cleanup_ctx.append(engine_lifespan(config))
    app.on_response_prepare.append(stamp_request_id)
    api = AudioApi(app)
    routes = app.router
    routes.add_post("/v1/audio/transcriptions", rendering_errors(api.transcriptions))
    routes.add_post("/v1/audio/translations", rendering_errors(api.translations))
    routes.add_post("/v1/audio/speech", rendering_errors(api.speech))
    routes.add_get("/v1/models", rendering_errors(api.list_models), allow_head=False)
    routes.add_get("/health", rendering_errors(api.health), allow_head=False)
    add_fallback_routes(app, "the audio engine serves /v1/audio/transcriptions, /v1/audio/translations, "
                             "/v1/audio/speech, /v1/models and /health")
    return app
