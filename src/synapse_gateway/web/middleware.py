"""The one error middleware of both apps: every failure becomes the OpenAI envelope, stamped with its request id."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..errors import GatewayError, InternalError, MethodNotAllowed, NotFound, error_response
from .requestid import request_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
__all__ = ["FAILURE", "REQUEST_ID", "STARTED", "Handler", "Middleware", "errors", "request_id_of"]
REQUEST_ID = web.RequestKey("request_id", str)
# Set by a handler once its response has started: an error can then no longer be answered as a status.
STARTED = web.RequestKey("response_started", bool)
# The error a request failed with, for whoever observes the request after the middleware (access log).
FAILURE = web.RequestKey("failure", GatewayError)

log = logging.getLogger("synapse.web")


def request_id_of(request: web.Request) -> str:
    """This request's id: assigned once, on first use."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        rid = request[REQUEST_ID] = request_id(request)
    return rid


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render GatewayError as its envelope, anything else as a 500 naming the request id (traceback: log)."""
    rid = request_id_of(request)
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        log.info("client went away", extra={"fields": {"request_id": rid, "path": request.path}})
        raise
    except web.HTTPException:
        raise  # aiohttp's own answers (e.g. its 413 while reading a body) keep their meaning
    except Exception as exc:
        if request.get(STARTED):  # the status is sent: cut the connection so the client sees a failure
            log.exception("request failed after its response began", extra={"fields": {"request_id": rid}})
            raise
        if not isinstance(exc, GatewayError):
            log.exception("unexpected error", extra={"fields": {"request_id": rid, "path": request.path}})
            exc = InternalError(rid)
        elif exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message, extra={"fields": {"request_id": rid}})
        request[FAILURE] = exc
        response = error_response(exc)
        if exc.status in (408, 413):  # the body was not read to its end: the connection cannot be reused
            response.force_close()
        return response


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response names its request id, errors and streams included."""
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = request_id_of(request)


def add_fallback_routes(app: web.Application, routes_hint: str) -> None:
    """405 for a wrong method on a known path and 404 for any other path, both as envelopes."""

    async def method_not_allowed(request: web.Request) -> web.Response:
        raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")

    async def not_found(request: web.Request) -> web.Response:
        raise NotFound(f"{request.method} {request.path} is not a route of this server; {routes_hint}")

    for resource in list(app.router.resources()):
        if isinstance(resource, web.Resource):
            resource.add_route("*", method_not_allowed)
    app.router.add_route("*", "/{tail:.*}", not_found)
