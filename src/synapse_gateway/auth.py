"""Who may call which route: the master key when one is set; without one, admin routes only from this machine.

A stopgap until per-user keys exist: it fails closed when the operator configured a key (a LiteLLM
`general_settings.master_key` included), and it keeps a browser page or a rebound DNS name from
driving the admin routes of a gateway on localhost.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress

from aiohttp import web

from .errors import Forbidden, Unauthorized
from .web.errors import Guard, Handler

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: `Authorization: Bearer`, or `x-api-key` / `api-key` as other SDKs send it."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or request.headers.get("api-key") or None


def requiring_key(master_key: str) -> Guard:
    """A guard for every route but health: the master key, compared in constant time."""
    secret = master_key.encode()

    def guard(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def check_key(request: web.Request) -> web.StreamResponse:
            key = presented_key(request)
            if key is None:
                raise Unauthorized("this gateway needs an API key: send `Authorization: Bearer <key>`")
            if not hmac.compare_digest(key.encode(), secret):
                raise Unauthorized("the API key is not valid for this gateway")
            return await handler(request)

        return check_key

    return guard


def local_only(handler: Handler) -> Handler:
    """An admin route of a gateway without a master key: it answers only this machine (see below)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        _only_from_this_machine(request)
        return await handler(request)

    return guarded


def _only_from_this_machine(request: web.Request) -> None:
    """Admin routes without a master key: a loopback peer, a loopback Host, and JSON for any change."""
    fix = "set a master key (auth.master_key in the config, or SYNAPSE_MASTER_KEY) to reach it from elsewhere"
    try:
        local_peer = request.remote is not None and ipaddress.ip_address(request.remote).is_loopback
    except ValueError:
        local_peer = False
    if not local_peer:
        raise Forbidden(f"{request.path} answers only clients on this machine; {fix}")
    if _host_name(request.host or "").lower() not in _LOCAL_HOSTS:
        raise Forbidden(f"{request.path} answers only requests addressed to localhost (Host: {request.host!r}); {fix}")
    if request.method not in ("GET", "HEAD", "OPTIONS") and request.content_type != "application/json":
        raise Forbidden(f"{request.method} {request.path} needs `Content-Type: application/json` "
                        "(so that a web page cannot send it)")


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (`[::1]:4000` -> `::1`)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
