"""HTTP handlers: the OpenAI API, model listing, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from .accesslog import RequestRecord
from .body import read_json_body
from .errors import GatewayError, InternalError, MethodNotAllowed, ModelNotFound, NotFound, error_response
from .gateway import GATEWAY_KEY, Gateway
from .metrics import CONTENT_TYPE
from .proxy import BodyFor, JsonBody
from .requestid import request_id
from .scheduler.build import Gpu
from .upload import MultipartUpload

log = logging.getLogger("synapse.api")
_ROUTED = {"exact", "alias", "pattern", "discovered"}
JSON_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/speech")
UPLOAD_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
API_PATHS = {path: path.removeprefix("/v1") for path in (*JSON_PATHS, *UPLOAD_PATHS)}
BodyReader = Callable[[web.Request, RequestRecord], Awaitable[tuple[str, BodyFor]]]


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """Every response names its request id and backend; the proxy path has set both already."""
    headers = response.headers
    if "x-request-id" not in headers:
        headers["x-request-id"] = request_id(request)
    if "x-synapse-backend" not in headers:
        headers["x-synapse-backend"] = "none"


class Api:
    """The route handlers; each one reads the gateway from the app it serves."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY_KEY]

    async def inference(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/audio/speech: JSON, routed by model."""
        return await self._handle(request, self._read_json)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/audio/transcriptions and /v1/audio/translations: multipart, streamed through."""
        return await self._handle(request, self._read_upload)

    async def _read_json(self, request: web.Request, record: RequestRecord) -> tuple[str, BodyFor]:
        payload, raw = await read_json_body(request, self.gateway.loaded.config.server.max_body_size)
        record.stream = bool(payload.get("stream"))
        return payload["model"], JsonBody(payload, raw)

    async def _read_upload(self, request: web.Request, record: RequestRecord) -> tuple[str, BodyFor]:
        upload = await MultipartUpload.read_head(request, self.gateway.loaded.config.server.max_upload_size)
        return upload.model, upload

    async def _handle(self, request: web.Request, read: BodyReader) -> web.StreamResponse:
        gateway = self.gateway
        record = RequestRecord(request_id(request), request.method, request.path, time.perf_counter())
        try:
            model, body_for = await read(request, record)
            record.model = model
            resolution = gateway.router.resolve(model, use_fallback=False)
            if resolution is None:
                await gateway.catalog.refresh_on_miss(model)
                resolution = gateway.router.resolve(model)
            if resolution is None:
                raise ModelNotFound(model)
            record.route = resolution.source
            return await gateway.proxy.forward(request, record, resolution, body_for=body_for,
                                               api_path=API_PATHS[request.path])
        except GatewayError as exc:
            return self._fail(record, exc)
        except (asyncio.CancelledError, ConnectionResetError):
            record.status, record.error = 499, "client disconnected"
            raise
        except Exception:
            log.exception("unexpected error", extra={"fields": {"request_id": record.request_id}})
            return self._fail(record, InternalError(record.request_id))
        finally:
            self._finish(gateway, record)

    def _fail(self, record: RequestRecord, exc: GatewayError) -> web.Response:
        record.status, record.error = exc.status, exc.message
        headers = {"x-request-id": record.request_id}
        if record.backend:
            headers["x-synapse-backend"] = record.backend
        return error_response(exc, headers)

    def _finish(self, gateway: Gateway, record: RequestRecord) -> None:
        finished = time.perf_counter()
        routed = record.route in _ROUTED or (record.route == "fallback" and record.status < 400)
        label = record.model if routed and record.model else "unknown"
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
        if not gateway.router.discovered and any(b.discover for b in gateway.backends.values()):
            await gateway.catalog.refresh_on_miss("")
        created = int(gateway.started_at)
        data = [{"id": name, "object": "model", "created": created, "owned_by": owner}
                for name, owner in sorted(gateway.router.public_models().items())]
        return _json({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one listed model, or 404 model_not_found."""
        gateway = self.gateway
        model = request.match_info["model"]
        owner = gateway.router.public_models().get(model)
        if owner is None:
            await gateway.catalog.refresh_on_miss(model)
            owner = gateway.router.public_models().get(model)
        if owner is None:
            return error_response(ModelNotFound(model))
        return _json({"id": model, "object": "model", "created": int(gateway.started_at), "owned_by": owner})

    async def live(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        """GET /health/ready: 200 once the config is loaded and until shutdown starts; lists backends."""
        gateway = self.gateway
        backends = {b.name: {"url": b.url, "protocol": b.protocol, "reachable": b.reachable,
                             "error": b.last_error, "in_flight": b.in_flight,
                             "models": sorted(b.discovered or b.static_models)}
                    for b in gateway.backends.values()}
        if gateway.draining or not gateway.ready:
            return _json({"status": "draining" if gateway.draining else "starting", "backends": backends}, 503)
        return _json({"status": "ready", "backends": backends})

    async def metrics(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        for backend in gateway.backends.values():
            gateway.metrics.backend_up.labels(backend.name).set(1 if backend.reachable else 0)
        return web.Response(body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def engines(self, request: web.Request) -> web.Response:
        """GET /admin/engines: each managed engine's state, PID, uptime, restarts and memory."""
        return _json({"engines": [engine.status() for engine in self.gateway.engines]})

    async def gpu_status(self, request: web.Request) -> web.Response:
        """GET /admin/gpu: the budget of each device and the state of each unit."""
        gpu = self._gpu()
        scheduler = gpu.scheduler
        devices = [{"device": name, "budget": scheduler.capacity(name), "used": scheduler.used(name)}
                   for name in scheduler.devices]
        return _json({"devices": devices, "units": scheduler.status()})

    async def gpu_action(self, request: web.Request) -> web.Response:
        """POST /admin/gpu/{unit}/wake|sleep: wake a unit now, or put it to sleep if it is idle."""
        scheduler = self._gpu().scheduler
        name, action = request.match_info["unit"], request.match_info["action"]
        unit = scheduler.units.get(name)
        if unit is None:
            return error_response(NotFound(f"no GPU-scheduled unit {name!r}; GET /admin/gpu lists them"))
        try:
            await (scheduler.wake(unit) if action == "wake" else scheduler.sleep(unit))
        except GatewayError as exc:
            if exc.code == "backend_busy":
                exc.status = 409
            return error_response(exc)
        return _json({"unit": name, "state": str(unit.state)})

    def _gpu(self) -> Gpu:
        gpu = self.gateway.gpu
        if gpu is None:
            raise web.HTTPNotFound(text='{"error": {"message": "no gpu: section in the config", '
                                        '"type": "invalid_request_error", "param": null, "code": "not_found"}}',
                                   content_type="application/json")
        return gpu

    async def not_found(self, request: web.Request) -> web.Response:
        error = NotFound(f"{request.method} {request.path} is not a route of this gateway; "
                         "see the README for the API")
        return error_response(error)

    async def method_not_allowed(self, request: web.Request) -> web.Response:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
