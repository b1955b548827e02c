"""Builds the aiohttp application: routes, lifespan and limits."""

from __future__ import annotations

from aiohttp import web

from .api import JSON_PATHS, UPLOAD_PATHS, Api, stamp_response
from .config import LoadedConfig
from .gateway import lifespan


def create_app(loaded: LoadedConfig) -> web.Application:
    """The gateway as an aiohttp app; its shared parts are built when the app starts."""
    limit = loaded.config.server.max_body_size
    app = web.Application(client_max_size=limit, handler_args={"max_field_size": 16384})
    app.cleanup_ctx.append(lifespan(loaded))
    app.on_response_prepare.append(stamp_response)
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
    routes.add_post("/admin/gpu/{unit}/{action:wake|sleep}", api.gpu_action)
    for resource in list(routes.resources()):
        if isinstance(resource, web.Resource):
            resource.add_route("*", api.method_not_allowed)
    routes.add_route("*", "/{tail:.*}", api.not_found)
    return app
