"""Builds the gateway's aiohttp application: middleware, the route table, and the lifespan."""

from __future__ import annotations

from aiohttp import web

from .api import JSON_PATHS, UPLOAD_PATHS, Api, stamp_backend
from .auth import access_middleware
from .config import LoadedConfig
from .gateway import lifespan
from .web.middleware import add_fallback_routes, errors, stamp_request_id


def create_app(loaded: LoadedConfig) -> web.Application:
    """The gateway as an aiohttp app; its shared parts are built when the app starts."""
    config = loaded.config
    app = web.Application(client_max_size=config.server.max_body_size, handler_args={"max_field_size": 16384},
                          middlewares=[errors, access_middleware(config.auth.master_key)])
    app.cleanup_ctx.append(lifespan(loaded))
    app.on_response_prepare.append(stamp_request_id)
    app.on_response_prepare.append(stamp_backend)
    api = Api(app)
    routes = app.router
    for path in JSON_PATHS:
        routes.add_post(path, api.inference)
    for path in UPLOAD_PATHS:
        routes.add_post(path, api.upload)
    routes.add_get("/v1/models", api.list_models, allow_head=False)
    routes.add_get("/v1/models/{model:.+}", api.get_model, allow_head=False)
    routes.add_get("/health/live", api.live, allow_head=False)
    routes.add_get("/health/ready", api.ready, allow_head=False)
    routes.add_get("/metrics", api.metrics, allow_head=False)
    routes.add_get("/admin/engines", api.engines, allow_head=False)
    routes.add_get("/admin/gpu", api.gpu_status, allow_head=False)
    routes.add_post("/admin/gpu/{unit:.+}/{action:wake|sleep}", api.gpu_action)
    add_fallback_routes(app, "see the README for the API")
    return app
