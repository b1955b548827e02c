"""The one error layer of both apps: every failure becomes the OpenAI envelope, stamped with its request id.

It wraps each route of an app's table (`rendering_errors`) rather than sitting in aiohttp's
middleware chain: once an app has any middleware, aiohttp adds a second layer of its own to every
request, and together they cost about 2.5% of the gateway's throughput per core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import GatewayError, InternalError, MethodNotAllowed, NotFound, error_response
from .requestid import request_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A route's access check: raises a GatewayError to refuse. Synchronous (keys are checked in memory), and
# run by the error layer itself, so a guarded route costs no extra coroutine per request.
Check = Callable[[web.Request], None]
REQUEST_ID = web.RequestKey("request_id", str)
# Set by a handler once its response has started: an error can then no longer be answered as a status.
STARTED = web.RequestKey("response_started", bool)

log = logging.getLogger("synapse.web")


def request_id_of(request: web.Request) -> str:
    """This request's id: assigned once, on first use."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        rid = request[REQUEST_ID] = request_id(request)
    return rid


def rendering_errors(handler: Handler, check: Check | None = None) -> Handler:
    """`handler` (after `check`, when given), with every GatewayError rendered as its envelope and
    anything else as a 500 naming the request id (the traceback goes to the log)."""

    async def render(request: web.Request) -> web.StreamResponse:
        try:
            if check is not None:
                check(request)
            return await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            log.info("client went away", extra={"fields": {"request_id": request_id_of(request),
                                                            "path": request.path}})
            raise
        except web.HTTPException:
            raise  # aiohttp's own answers keep their meaning
        except Exception as exc:
            if request.get(STARTED):  # the status is sent: cut the connection so the client sees a failure
                log.exception("request failed after its response began",
                              extra={"fields": {"request_id": request_id_of(request)}})
                raise
            return _error_response(request, exc)

    return render


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    rid = request_id_of(request)
    if not isinstance(exc, GatewayError):
        log.exception("unexpected error", extra={"fields": {"request_id": rid, "path": request.path}})
        exc = InternalError(rid)
    elif exc.status >= 500:
        log.warning("%s: %s", exc.code, exc.message, extra={"fields": {"request_id": rid}})
    response = error_response(exc)
    if exc.status in (408, 413):  # the body was not read to its end: the connection cannot be reused
        response.force_close()
    return response


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response names its request id, errors and streams included."""
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = request_id_of(request)


def add_fallback_routes(app: web.Application, routes_hint: str, check: Check | None = None) -> None:
    """405 for a wrong method on a known path and 404 for any other path, both as envelopes.

    `check` (the app's access check, if any) runs first, so an unknown path tells a caller without
    a key nothing about which paths exist.
    """

    async def method_not_allowed(request: web.Request) -> web.Response:
        raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")

    async def not_found(request: web.Request) -> web.Response:
        raise NotFound(f"{request.method} {request.path} is not a route of this server; {routes_hint}")

    def wrap(handler: Handler) -> Handler:
        return rendering_errors(handler, check)

    for resource in list(app.router.resources()):
        if isinstance(resource, web.Resource):
            resource.add_route("*", wrap(method_not_allowed))
    app.router.add_route("*", "/{tail:.*}", wrap(not_found))
