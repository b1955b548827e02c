"""Key management over HTTP, compatible with LiteLLM's `/key/*` routes, and the usage report.

LiteLLM users have scripts: the routes, their field names (`models`, `rpm_limit`, `tpm_limit`,
`max_parallel_requests`, `max_budget`, `budget_duration`, `duration`, `key_alias`, `metadata`) and
`{"key": "sk-..."}` on generate are the same. LiteLLM fields for concepts Synapse does not have
(teams, users, tags...) are accepted, ignored, and named in the answer's `ignored_fields`; any other
unknown field is a 400, so a typo never silently drops a limit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from ..config.access import KeySettings
from ..config.units import parse_duration
from ..errors import DatabaseUnavailable, InvalidRequest
from ..gateway import GATEWAY_KEY, Gateway
from ..storage.database import StorageError
from ..storage.report import Grouping, usage_report
from ..web.responses import json_response
from .keyring import Keyring
from .keys import ApiKey, key_id_of

_SETTINGS = set(KeySettings.model_fields)
# LiteLLM's key fields with no Synapse meaning: accepted so existing scripts run, and reported.
_LITELLM_ONLY = {
    "team_id", "user_id", "organization_id", "key_name", "tags", "soft_budget", "aliases", "config",
    "permissions", "spend", "guardrails", "allowed_cache_controls", "model_max_budget", "model_rpm_limit",
    "model_tpm_limit", "send_invite_email", "budget_id", "enforced_params", "object_permission",
    "allowed_routes", "key_type", "auto_rotate", "rotation_interval", "prompts", "rpm_limit_type",
    "tpm_limit_type", "max_parallel_requests_type", "temp_budget_increase", "temp_budget_expiry",
}
_GROUPS: tuple[Grouping, ...] = ("key", "model", "day", "backend")


class KeyRoutes:
    """The handlers; they read the keyring, limiter and database of the gateway the app runs."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY_KEY]

    @property
    def keyring(self) -> Keyring:
        return self.gateway.keyring

    async def generate(self, request: web.Request) -> web.Response:
        """POST /key/generate: a new key, shown once in `key`."""
        body = await _json(request)
        if "key" in body:
            raise InvalidRequest("Synapse makes every key itself (192 random bits); leave out `key`", param="key")
        settings, ignored = _settings(body, base={})
        key, secret = await self.keyring.create(settings)
        return json_response({"key": secret, **await self._shown(key), **_ignored(ignored)})

    async def update(self, request: web.Request) -> web.Response:
        """POST /key/update: change a key's settings (fields not sent are kept)."""
        body = await _json(request)
        key = self.keyring.find(_reference(body))
        changes, ignored = _changes(body)
        updated = await _validated(self.keyring.update(key.id, changes))
        return json_response({**await self._shown(updated), **_ignored(ignored)})

    async def block(self, request: web.Request) -> web.Response:
        """POST /key/block (revoke) and /key/unblock."""
        body = await _json(request)
        revoked = request.path.endswith("/block")
        key = await _validated(self.keyring.update(_reference(body), {"revoked": revoked}))
        return json_response(await self._shown(key))

    async def regenerate(self, request: web.Request) -> web.Response:
        """POST /key/regenerate: a new secret for the same key. (The key goes in the body, never in the
        path, where it would reach access logs and proxies.)"""
        key, secret = await self.keyring.rotate(_reference(await _json(request)))
        return json_response({"key": secret, **await self._shown(key)})

    async def delete(self, request: web.Request) -> web.Response:
        """POST /key/delete with `keys: [...]` (or one `key`)."""
        body = await _json(request)
        references = body.get("keys") if "keys" in body else [_reference(body)]
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references) or not references:
            raise InvalidRequest("`keys` must be a non-empty list of keys or key ids", param="keys")
        keys = {key.id: key for key in map(self.keyring.writable, references)}  # all checked before any goes
        deleted = [(await self.keyring.delete(key_id)).id for key_id in keys]
        return json_response({"deleted_keys": deleted})

    async def info(self, request: web.Request) -> web.Response:
        """GET /key/info?key=...: one key, with its spend in the current budget period."""
        reference = request.query.get("key")
        if not reference:
            raise InvalidRequest("name the key: GET /key/info?key=<key or key id>", param="key")
        key = self.keyring.find(reference)
        return json_response({"key": key.id, "info": await self._shown(key)})

    async def list(self, request: web.Request) -> web.Response:
        """GET /key/list: key ids (or whole keys with `return_full_object=true`), newest first."""
        alias = request.query.get("key_alias")
        keys = sorted((k for k in self.keyring.keys.values() if alias is None or k.settings.key_alias == alias),
                      key=lambda k: k.created_at, reverse=True)
        full = request.query.get("return_full_object", "").lower() == "true"
        listed: list[Any] = [await self._shown(k) for k in keys] if full else [k.id for k in keys]
        return json_response({"keys": listed, "total_count": len(keys), "current_page": 1, "total_pages": 1})

    async def usage(self, request: web.Request) -> web.Response:
        """GET /usage/report?since=&until=&group_by=key,model,day&key=: the usage ledger, summed."""
        query = request.query
        asked = [g for g in query.get("group_by", "key,model,day").split(",") if g]
        unknown = [g for g in asked if g not in _GROUPS]
        if unknown:
            raise InvalidRequest(f"cannot group by {unknown}; use any of {', '.join(_GROUPS)}", param="group_by")
        groups = [g for g in _GROUPS if g in asked]
        reference = query.get("key")
        key_id = (key_id_of(reference) or reference) if reference else None  # deleted keys keep their usage
        since, until = _moment(query.get("since"), "since"), _moment(query.get("until"), "until")
        try:
            rows = await usage_report(await self.gateway.state(), since=since, until=until, group_by=groups,
                                      key_id=key_id)
        except StorageError as exc:
            raise DatabaseUnavailable(f"the usage database cannot be read: {exc}") from exc
        return json_response({"data": rows, "group_by": groups})

    async def _shown(self, key: ApiKey) -> dict[str, Any]:
        shown = key.public()
        limits = key.limits(time.time())
        spent = await self.gateway.access.limiter.spent(key.id, limits.period)
        shown.update(spend=spent.cost, spend_tokens=spent.tokens)
        return shown


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def _reference(body: dict[str, Any]) -> str:
    reference = body.get("key")
    if not isinstance(reference, str) or not reference:
        raise InvalidRequest("name the key: `\"key\": \"<key or key id>\"`", param="key")
    return reference


def _changes(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The settings a request sets, with LiteLLM's `duration` and `blocked` translated."""
    changes: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in body.items():
        if name == "key":
            continue
        if name == "duration":
            changes["expires_at"] = _expiry(value)
        elif name == "blocked":
            changes["revoked"] = value  # validated as a boolean with the rest
        elif name in _SETTINGS:
            changes[name] = value
        elif name in _LITELLM_ONLY:
            ignored.append(name)
        else:
            raise InvalidRequest(f"unknown field `{name}`; key fields are: {', '.join(sorted(_SETTINGS))}",
                                 param=name)
    return changes, ignored


def _settings(body: dict[str, Any], base: dict[str, Any]) -> tuple[KeySettings, list[str]]:
    changes, ignored = _changes(body)
    try:
        return KeySettings.model_validate({**base, **changes}), ignored
    except ValidationError as exc:
        raise InvalidRequest(_first_problem(exc), param=_first_field(exc)) from None


async def _validated(update: Awaitable[ApiKey]) -> ApiKey:
    """A key update whose new settings are checked: a bad value is a 400 naming the field."""
    try:
        return await update
    except ValidationError as exc:
        raise InvalidRequest(_first_problem(exc), param=_first_field(exc)) from None


def _expiry(value: object) -> float | None:
    if value is None or value in ("permanent", "-1", -1):
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc).split("|")[0], param="duration") from None
    if not isinstance(seconds, float) or seconds <= 0:
        raise InvalidRequest("`duration` must be a positive duration such as 30d, 24h or 1h", param="duration")
    return time.time() + seconds


def _moment(value: str | None, name: str) -> float | None:
    """A report bound: unix seconds or an ISO date/time (UTC when no zone is given)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be unix seconds or an ISO date such as 2026-11-30",
                             param=name) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _ignored(ignored: list[str]) -> dict[str, Any]:
    return {"ignored_fields": ignored} if ignored else {}


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"`{where}`: {error['msg'].split('|')[0]}"


def _first_field(exc: ValidationError) -> str | None:
    loc = exc.errors()[0]["loc"]
    return str(loc[0]) if loc else None
