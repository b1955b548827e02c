"""Who may call which route: each route's guard authenticates the key it was sent, in memory.

- inference routes: with `auth.mode: required`, a key of the `inference` scope or the master key;
  with `off`, anyone (and no check is paid for);
- `/metrics`: the master key or an `admin` key, or open (`auth.metrics: open`);
- `/health/*`: open, but with keys required only an admin sees the readiness details (backends, models);
- admin and key-management routes: the master key or an `admin`-scope key; with neither configured,
  only this machine (a loopback peer and Host, JSON for changes), so that a web page or a rebound
  DNS name cannot drive them.

A refused key is answered with one message whatever the reason (missing, unknown, expired, revoked),
and no part of it is ever echoed or logged.
"""

from __future__ import annotations

import ipaddress
import logging

from aiohttp import web

from .access.keyring import Keyring
from .access.keys import MASTER, Principal, key_id_of
from .config.access import AuthConfig
from .errors import Forbidden, Unauthorized
from .web.errors import Check, request_id_of

PRINCIPAL = web.RequestKey("principal", Principal)
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_INVALID = "invalid API key: send a valid key as `Authorization: Bearer <key>`"
log = logging.getLogger("synapse.auth")


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: `Authorization: Bearer`, or `x-api-key` / `api-key` as other SDKs send it."""
    authorization = request.headers.get("Authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or request.headers.get("api-key") or None


class Guards:
    """The access check of each kind of route, built from the auth config and the keyring.

    A check is None where nothing is checked (inference with auth off), so that route pays nothing.
    """

    def __init__(self, auth: AuthConfig, keyring: Keyring) -> None:
        self.keyring = keyring
        self.inference: Check | None = self._inference if auth.required else None
        self.metrics: Check | None = self._admin_key if auth.metrics == "keyed" and auth.required else None
        self.admin: Check = self._admin

    def _inference(self, request: web.Request) -> None:
        principal = _authenticate(request, self.keyring)
        if principal.key is not None and principal.key.admin:
            _refuse(request, principal, "an admin key used on an inference route")
            raise Forbidden("this key has the `admin` scope, which manages the gateway but cannot run "
                            "inference; use an inference key", code="scope_not_allowed")
        request[PRINCIPAL] = principal

    def _admin_key(self, request: web.Request) -> None:
        principal = _authenticate(request, self.keyring)
        if not principal.admin:  # admin routes and the metrics name every model and backend
            _refuse(request, principal, f"an inference key used on {request.path}")
            raise Forbidden(f"{request.path} needs the master key or a key with the `admin` scope",
                            code="scope_not_allowed")
        request[PRINCIPAL] = principal

    def _admin(self, request: web.Request) -> None:
        if presented_key(request) is None and not self.keyring.has_master:
            _only_from_this_machine(request)  # nothing to authenticate with: the local operator
            request[PRINCIPAL] = MASTER
            return
        self._admin_key(request)


def is_admin(request: web.Request, keyring: Keyring) -> bool:
    """Whether an unguarded request carries the master key or an admin key (never raises)."""
    key = presented_key(request)
    principal = keyring.authenticate(key) if key is not None else None
    return principal is not None and principal.admin


def _authenticate(request: web.Request, keyring: Keyring) -> Principal:
    key = presented_key(request)
    principal = keyring.authenticate(key) if key is not None else None
    if principal is None:
        reason = "no key" if key is None else "a key that is unknown, expired or revoked"
        log.info("refused %s %s: %s", request.method, request.path, reason,
                 extra={"fields": {"request_id": request_id_of(request), "remote": request.remote,
                                   "key_id": key_id_of(key) if key else None}})
        raise Unauthorized(_INVALID)
    return principal


def _refuse(request: web.Request, principal: Principal, reason: str) -> None:
    log.info("refused %s %s: %s", request.method, request.path, reason,
             extra={"fields": {"request_id": request_id_of(request), "key_id": principal.id}})


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


__all__ = ["PRINCIPAL", "Guards", "is_admin", "presented_key"]
