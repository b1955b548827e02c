"""Builds the gateway's aiohttp application: the route table, each route with its guard and error layer."""

from __future__ import annotations

from aiohttp import web

from .access.keyring import Keyring
from .access.management import KeyRoutes
from .api import JSON_PATHS, UPLOAD_PATHS, Api, stamp_response
from .auth import Guards
from .config import LoadedConfig
from .gateway import lifespan
from .state import StateDatabase
from .web.errors import Check, Handler, add_fallback_routes, rendering_errors


def create_app(loaded: LoadedConfig) -> web.Application:
    """The gateway as an aiohttp app; its shared parts are built when the app starts.

    Access (see `auth.py`): with `auth.mode: required` every route but health needs a key; without
    it, inference pays for no check at all, and only the admin routes are guarded.
    """
    config = loaded.config
    state = StateDatabase(config.database())
    keyring = Keyring(config.auth, state)
    guards = Guards(config.auth, keyring)
    app = web.Application(client_max_size=config.server.max_body_size, handler_args={"max_field_size": 16384})
    app.cleanup_ctx.append(lifespan(loaded, keyring, state))
    app.on_response_prepare.append(stamp_response)
    api = Api(app)
    keys = KeyRoutes(app)
    routes = app.router

    def add(method: str, path: str, handler: Handler, check: Check | None) -> None:
        routes.add_route(method, path, rendering_errors(handler, check))

    for path in JSON_PATHS:
        add("POST", path, api.inference, guards.inference)
    for path in UPLOAD_PATHS:
        add("POST", path, api.upload, guards.inference)
    add("GET", "/v1/models", api.list_models, guards.inference)
    add("GET", "/v1/models/{model:.+}", api.get_model, guards.inference)
    add("GET", "/health/live", api.live, None)
    add("GET", "/health/ready", api.ready, None)
    add("GET", "/metrics", api.metrics, guards.metrics)
    add("GET", "/admin/engines", api.engines, guards.admin)
    add("GET", "/admin/gpu", api.gpu_status, guards.admin)
    add("POST", "/admin/gpu/{unit:.+}/{action:wake|sleep}", api.gpu_action, guards.admin)
    add("POST", "/key/generate", keys.generate, guards.admin)
    add("POST", "/key/update", keys.update, guards.admin)
    add("POST", "/key/delete", keys.delete, guards.admin)
    add("POST", "/key/block", keys.block, guards.admin)
    add("POST", "/key/unblock", keys.block, guards.admin)
    add("POST", "/key/regenerate", keys.regenerate, guards.admin)
    add("GET", "/key/info", keys.info, guards.admin)
    add("GET", "/key/list", keys.list, guards.admin)
    add("GET", "/usage/report", keys.usage, guards.admin)
    add_fallback_routes(app, "see the README for the API", guards.inference)
    return app
