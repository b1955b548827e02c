"""Builds the audio engine's aiohttp application: routes, the error envelope, request ids."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import GatewayError, InternalError, MethodNotAllowed, NotFound, error_response
from ..requestid import request_id
from .config import AudioEngineConfig
from .engine import engine_lifespan
from .forms import JSON_BODY_LIMIT
from .handlers import REQUEST_ID, STREAMING, AudioApi

log = logging.getLogger("synapse.audio")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_audio_app(config: AudioEngineConfig) -> web.Application:
    """The OpenAI audio API over the configured Whisper models and Piper voices; models load on first use."""
    app = web.Application(client_max_size=JSON_BODY_LIMIT, middlewares=[_errors])
    app.cleanup_ctx.append(engine_lifespan(config))
    app.on_response_prepare.append(_stamp)
    api = AudioApi(app)
    routes = app.router
    routes.add_post("/v1/audio/transcriptions", api.transcriptions)
    routes.add_post("/v1/audio/translations", api.translations)
    routes.add_post("/v1/audio/speech", api.speech)
    routes.add_get("/v1/models", api.list_models, allow_head=False)
    routes.add_get("/health", api.health, allow_head=False)
    for resource in list(routes.resources()):
        if isinstance(resource, web.Resource):
            resource.add_route("*", _method_not_allowed)
    routes.add_route("*", "/{tail:.*}", _not_found)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every GatewayError becomes its envelope; anything else a 500 naming the request id (traceback: log)."""
    rid = request[REQUEST_ID] = request_id(request)
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        log.info("client went away", extra={"fields": {"request_id": rid, "path": request.path}})
        raise
    except Exception as exc:
        if request.get(STREAMING):  # the status is sent: cut the connection so the client sees a failure
            log.exception("speech failed after streaming began", extra={"fields": {"request_id": rid}})
            raise
        if isinstance(exc, GatewayError):
            return error_response(exc)
        log.exception("unexpected error", extra={"fields": {"request_id": rid, "path": request.path}})
        return error_response(InternalError(rid))


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid and "x-request-id" not in response.headers:
        response.headers["x-request-id"] = rid


async def _not_found(request: web.Request) -> web.Response:
    raise NotFound(f"{request.method} {request.path} is not a route of the audio engine; it serves "
                   "/v1/audio/transcriptions, /v1/audio/translations, /v1/audio/speech, /v1/models, /health")


async def _method_not_allowed(request: web.Request) -> web.Response:
    raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
