"""Builds the gateway's aiohttp application: the route table, each route with its guard and error layer."""

from __future__ import annotations

from aiohttp import web

from .api import JSON_PATHS, UPLOAD_PATHS, Api, stamp_response
from .auth import local_only, requiring_key
from .config import LoadedConfig
from .gateway import lifespan
from .web.errors import Guard, Handler, add_fallback_routes, rendering_errors


def create_app(loaded: LoadedConfig) -> web.Application:
    """The gateway as an aiohttp app; its shared parts are built when the app starts.

    Access: with a master key, every route but health needs it; without one, only the admin routes
    are guarded (this machine only), and inference pays for no check at all.
    """
    config = loaded.config
    master_key = config.auth.master_key
    keyed: Guard = requiring_key(master_key) if master_key else _unguarded
    admin: Guard = keyed if master_key else local_only
    app = web.Application(client_max_size=config.server.max_body_size, handler_args={"max_field_size": 16384})
    app.cleanup_ctx.append(lifespan(loaded))
    app.on_response_prepare.append(stamp_response)
    api = Api(app)
    routes = app.router

    def add(method: str, path: str, handler: Handler, guard: Guard) -> None:
        routes.add_route(method, path, rendering_errors(guard(handler)))

    for path in JSON_PATHS:
        add("POST", path, api.inference, keyed)
    for path in UPLOAD_PATHS:
        add("POST", path, api.upload, keyed)
    add("GET", "/v1/models", api.list_models, keyed)
    add("GET", "/v1/models/{model:.+}", api.get_model, keyed)
    add("GET", "/health/live", api.live, _unguarded)
    add("GET", "/health/ready", api.ready, _unguarded)
    add("GET", "/metrics", api.metrics, keyed)
    add("GET", "/admin/engines", api.engines, admin)
    add("GET", "/admin/gpu", api.gpu_status, admin)
    add("POST", "/admin/gpu/{unit:.+}/{action:wake|sleep}", api.gpu_action, admin)
    add_fallback_routes(app, "see the README for the API", keyed)
    return app


def _unguarded(handler: Handler) -> Handler:
    return handler
