"""HTTP handlers of the gateway: the OpenAI API, model listing, health, metrics and the admin routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from aiohttp import web

from .access.control import Admitted, rate_headers
from .access.keys import ApiKey
from .accesslog import RequestRecord
from .auth import PRINCIPAL, is_admin
from .body import BodyDeadline, BodyFor, JsonBody, read_json_body
from .errors import GatewayError, ModelNotAllowed, ModelNotFound, NotFound
from .gateway import GATEWAY_KEY, Gateway
from .metrics import CONTENT_TYPE
from .scheduler.gpu import Gpu
from .storage.ledger import UsageEvent
from .upload import MultipartUpload
from .web.errors import REQUEST_ID, stamp_request_id
from .web.requestid import request_id
from .web.responses import json_response

JSON_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/speech")
UPLOAD_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
API_PATHS = {path: path.removeprefix("/v1") for path in (*JSON_PATHS, *UPLOAD_PATHS)}
RECORD = web.RequestKey("record", RequestRecord)
# Answers made of tokens: their `max_tokens` is reserved, and a stream is asked for its usage.
GENERATING_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))
BodyReader = Callable[[web.Request, RequestRecord, BodyDeadline], Awaitable[tuple[str, BodyFor]]]


async def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """Every response names its request id and the backend that answered it ("none" when no backend did)."""
    await stamp_request_id(request, response)
    headers = response.headers
    if "x-synapse-backend" not in headers:
        record = request.get(RECORD)
        headers["x-synapse-backend"] = (record.backend if record else None) or "none"


class Api:
    """The route handlers; each one reads the gateway from the app it serves."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._gateway: Gateway | None = None

    @property
    def gateway(self) -> Gateway:
        """The gateway the app's lifespan built (looked up once: handlers read it on every request)."""
        gateway = self._gateway
        if gateway is None:  # an app is started once, so its gateway never changes
            gateway = self._gateway = self.app[GATEWAY_KEY]
        return gateway

    async def inference(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/audio/speech: JSON, routed by model."""
        return await self._handle(request, self._read_json)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/audio/transcriptions and /v1/audio/translations: multipart, streamed through."""
        return await self._handle(request, self._read_upload)

    async def _read_json(self, request: web.Request, record: RequestRecord,
                         deadline: BodyDeadline) -> tuple[str, BodyFor]:
        gateway = self.gateway
        payload, raw = await read_json_body(request, gateway.settings.max_body_size, deadline)
        record.stream = bool(payload.get("stream"))
        if record.stream and request.path in GENERATING_PATHS and gateway.counts_usage:
            payload, raw = _asking_for_usage(payload, raw, record)
        elif request.path == "/v1/audio/speech" and isinstance(payload.get("input"), str):
            record.characters = len(payload["input"])
        return payload["model"], JsonBody(payload, raw)

    async def _read_upload(self, request: web.Request, record: RequestRecord,
                           deadline: BodyDeadline) -> tuple[str, BodyFor]:
        upload = await MultipartUpload.read_head(request, self.gateway.settings.max_upload_size, deadline)
        return upload.model, upload

    async def _handle(self, request: web.Request, read: BodyReader) -> web.StreamResponse:
        """Read, resolve, forward; the error layer renders failures, this records them."""
        gateway = self.gateway
        settings = gateway.settings
        rid = request[REQUEST_ID] = request_id(request)
        record = request[RECORD] = RequestRecord(rid, request.method, request.path, time.perf_counter())
        principal = request[PRINCIPAL] if gateway.keyring.required else None  # set by the route's check
        key = principal.key if principal is not None else None
        admitted: Admitted | None = None
        try:
            if principal is not None:
                record.key_id = key.id if key is not None else "master"
            deadline = BodyDeadline(idle=settings.body_idle_timeout, total=settings.body_timeout)
            model, body_for = await read(request, record, deadline)
            record.model = model
            try:
                resolution = await gateway.catalog.resolve(model)
            except ModelNotFound:
                if key is not None and not key.allows(model):
                    raise ModelNotAllowed(model) from None  # a restricted key learns nothing of other models
                raise
            record.source, record.route = resolution.source, resolution.route
            if key is not None:
                if key.restricted:
                    resolution = gateway.access.permit(key, resolution, asked=model)
                admitted = _admit(gateway, key, resolution.model, body_for, record)
                if admitted is not None and admitted.shared:  # limits held in Redis: one round trip
                    await gateway.access.acquire(admitted)
                    _note_rate(gateway, record, admitted)
            return await gateway.proxy.forward(request, record, resolution, body_for=body_for,
                                               api_path=API_PATHS[request.path],
                                               allows=key.allows if key is not None and key.restricted else None)
        except GatewayError as exc:
            record.status, record.error = exc.status, exc.message
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            record.status, record.error = 499, "client disconnected"
            raise
        except Exception:
            record.status, record.error = 500, "internal error"
            raise
        finally:
            if admitted is not None:
                used = gateway.access.settle(admitted, record)
                record.cost = used.cost
                if admitted.shared:
                    await gateway.access.settle_shared(admitted, used)
            self._finish(gateway, record)

    def _finish(self, gateway: Gateway, record: RequestRecord) -> None:
        finished = time.perf_counter()
        if gateway.ledger is not None:
            gateway.ledger.record(_usage_event(gateway, record, finished))
        label = record.route or "unknown"  # a route's name, never a client's raw model name
        ttft = record.ttft if record.stream else None
        gateway.metrics.observe(model=label, backend=record.backend or "none", status=record.status,
                                seconds=finished - record.started, ttft=ttft)
        if record.tokens_in is not None or record.tokens_out is not None:
            gateway.metrics.tokens.labels(label, "in").inc(record.tokens_in or 0)
            gateway.metrics.tokens.labels(label, "out").inc(record.tokens_out or 0)
        gateway.access_log.write(record, finished)

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: configured and discovered models, each once."""
        gateway = self.gateway
        created = int(gateway.started_at)
        models = await gateway.catalog.public_models()
        principal = request.get(PRINCIPAL)
        key = principal.key if principal is not None else None
        canonical = gateway.catalog.router.canonical
        data = [{"id": name, "object": "model", "created": created, "owned_by": owner}
                for name, owner in sorted(models.items()) if key is None or key.allows(canonical(name))]
        return json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one listed model, or 404 model_not_found."""
        gateway = self.gateway
        model = request.match_info["model"]
        owner = await gateway.catalog.find_model(model)
        principal = request.get(PRINCIPAL)
        key = principal.key if principal is not None else None
        if owner is None or (key is not None and not key.allows(gateway.catalog.router.canonical(model))):
            raise ModelNotFound(model)
        return json_response({"id": model, "object": "model", "created": int(gateway.started_at), "owned_by": owner})

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        """GET /health/ready: 200 once the engines started with the gateway serve (or have failed, listed here).

        503 while starting and once shutdown has begun.
        """
        gateway = self.gateway
        backends = {b.name: {"url": _public_url(b.url), "protocol": b.protocol, "reachable": b.reachable,
                             "error": b.last_error, "in_flight": b.in_flight,
                             "models": sorted(b.discovered or b.static_models)}
                    for b in gateway.backends.values()}
        engines = {e.name: {"state": str(e.state), "error": e.failure} for e in gateway.engines}
        failed = sorted(e.name for e in gateway.boot_engines if e.is_settled and not e.ready.is_set())
        body = {"backends": backends, "engines": engines, "failed_engines": failed}
        if gateway.keyring.required and not is_admin(request, gateway.keyring):
            body = {}  # with keys required, which backends and models exist is for admins to see
        if gateway.draining:
            return json_response({"status": "draining", **body}, 503)
        if not gateway.ready or not gateway.engines_settled:
            return json_response({"status": "starting", **body}, 503)
        return json_response({"status": "degraded" if failed else "ready", **body})

    async def metrics(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        for backend in gateway.backends.values():
            gateway.metrics.backend_up.labels(backend.name).set(1 if backend.reachable else 0)
        return web.Response(body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def engines(self, request: web.Request) -> web.Response:
        """GET /admin/engines: each managed engine's state, PID, uptime, restarts and memory."""
        return json_response({"engines": [engine.status() for engine in self.gateway.engines]})

    async def gpu_status(self, request: web.Request) -> web.Response:
        """GET /admin/gpu: the budget of each device and the state of each unit."""
        scheduler = self._gpu().scheduler
        devices = [{"device": name, "budget": scheduler.capacity(name), "used": scheduler.used(name)}
                   for name in scheduler.devices]
        return json_response({"devices": devices, "units": scheduler.status()})

    async def gpu_action(self, request: web.Request) -> web.Response:
        """POST /admin/gpu/{unit}/wake|sleep: wake a unit now, or put it to sleep if it is idle."""
        scheduler = self._gpu().scheduler
        name, action = request.match_info["unit"], request.match_info["action"]
        unit = scheduler.units.get(name)
        if unit is None:
            raise NotFound(f"no GPU-scheduled unit {name!r}; GET /admin/gpu lists them")
        await (scheduler.wake(unit) if action == "wake" else scheduler.sleep(unit))
        return json_response({"unit": name, "state": str(unit.state)})

    def _gpu(self) -> Gpu:
        gpu = self.gateway.gpu
        if gpu is None:
            raise NotFound("this gateway has no `gpu:` section in its config, so nothing is GPU-scheduled")
        return gpu


def _admit(gateway: Gateway, key: ApiKey, model: str, body_for: BodyFor, record: RequestRecord) -> Admitted | None:
    """Take the key's in-process limits for this request (429 when one refuses); not a coroutine."""
    json = body_for if isinstance(body_for, JsonBody) else None
    admitted = gateway.access.admit(key, model, json.payload if json else None, body_size=json.size if json else 0,
                                    generates=record.path in GENERATING_PATHS)
    if admitted is not None:
        _note_rate(gateway, record, admitted)
    return admitted


def _note_rate(gateway: Gateway, record: RequestRecord, admitted: Admitted) -> None:
    """The key's rate state after this request, for the answer's x-ratelimit-* headers (when they go on
    every answer: `auth.rate_limit_headers: always`)."""
    grant = admitted.grant
    if grant is not None and gateway.access.headers_always:
        record.rate = rate_headers(grant.limits.rpm, grant.limits.tpm, grant.remaining_requests,
                                   grant.remaining_tokens) or None


def _asking_for_usage(payload: dict[str, Any], raw: bytes, record: RequestRecord) -> tuple[dict[str, Any], bytes]:
    """A stream asks its backend for a final `usage` event (for limits and the ledger); when the client
    did not ask for one, the relay removes it again (`record.hide_usage`)."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return payload, raw
    if options is not None and not isinstance(options, dict):
        return payload, raw  # the backend will say what is wrong with it
    record.hide_usage = True
    payload = {**payload, "stream_options": {**(options or {}), "include_usage": True}}
    return payload, orjson.dumps(payload)


def _usage_event(gateway: Gateway, record: RequestRecord, finished: float) -> UsageEvent:
    latency = finished - record.started
    ttft = record.ttft
    cost = record.cost
    if cost is None:
        cost = gateway.access.cost(None, record.model or "", record)
    return UsageEvent(
        time=time.time() - latency, request_id=record.request_id, key_id=record.key_id, model=record.model,
        served_model=record.upstream_model, backend=record.backend, route=record.route, status=record.status,
        tokens_in=record.tokens_in, tokens_out=record.tokens_out, audio_seconds=record.audio_seconds,
        characters=record.characters, latency_ms=round(latency * 1000, 3),
        ttft_ms=None if ttft is None else round(ttft * 1000, 3), stream=record.stream, cost=cost,
        path=record.path)


def _public_url(url: str) -> str:
    """`url` without credentials (`user:pass@`) or a query, for an unauthenticated health answer."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
