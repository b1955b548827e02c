"""Forwards one API request: attempts across deployments with failover, then relays the answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from .accesslog import RequestRecord
from .backends import Backend
from .balancer import Balancer, Target
from .engines.process import EngineFailed
from .errors import GatewayError
from .metrics import Metrics
from .routing import Resolution, Router
from .scheduler.build import Gpu
from .scheduler.units import Unit
from .streaming import end_event_stream, keep_alive_while, relay, start_event_stream
from .upstream import TRANSPORT_ERRORS, AttemptFailed, Body, send, transport_failure

log = logging.getLogger("synapse.proxy")
_ERROR_BODY_LIMIT = 64 * 1024
# Answers relayed chunk by chunk as they arrive; anything else (JSON) is read whole first.
_STREAMED_TYPES = ("text/event-stream", "audio/", "application/octet-stream")
_JSON_HEADERS = {"Content-Type": "application/json"}


class BodyFor(Protocol):
    """What to send for a given upstream model name; `replayable` says whether a retry can resend it."""

    @property
    def replayable(self) -> bool: ...

    def __call__(self, upstream_model: str) -> tuple[Body, dict[str, str]]: ...


class JsonBody:
    """A parsed JSON request: its raw bytes when the model keeps its name, else re-serialised once per name."""

    replayable = True

    def __init__(self, payload: dict[str, Any], raw: bytes) -> None:
        self.payload = payload
        self.bodies = {payload["model"]: raw}

    def __call__(self, upstream_model: str) -> tuple[Body, dict[str, str]]:
        body = self.bodies.get(upstream_model)
        if body is None:
            body = self.bodies[upstream_model] = orjson.dumps({**self.payload, "model": upstream_model})
        return body, _JSON_HEADERS


class Proxy:
    """Sends requests to backends; owns nothing but references to the app's shared parts."""

    def __init__(self, session: aiohttp.ClientSession, router: Router, balancer: Balancer,
                 metrics: Metrics) -> None:
        self.session = session
        self.router = router
        self.balancer = balancer
        self.metrics = metrics
        self.gpu: Gpu | None = None

    async def forward(self, request: web.Request, record: RequestRecord, resolution: Resolution, *,
                      body_for: BodyFor, api_path: str) -> web.StreamResponse:
        """Try the resolution's deployments (then its fallback models) until one answers."""
        failure: AttemptFailed | None = None
        for attempt, target in enumerate(self._plan(resolution)):
            if attempt:
                if not body_for.replayable:
                    break
                record.retries += 1
                self.metrics.retries.labels(resolution.model, target.backend.name).inc()
            record.backend, record.upstream_model = target.backend.name, target.upstream_model
            body, headers = body_for(target.upstream_model)
            try:
                return await self._attempt(request, record, target, body, headers, api_path)
            except AttemptFailed as exc:
                failure = exc
                self._count_failure(target, exc)
        assert failure is not None
        raise failure.to_gateway_error()

    def _plan(self, resolution: Resolution) -> Iterator[Target]:
        yield from self.balancer.attempts(resolution.targets)
        for model in resolution.fallbacks:
            fallback = self.router.resolve(model)
            if fallback is not None:
                log.info("model %s failed on every deployment; falling back to %s", resolution.model, model)
                yield from self.balancer.attempts(fallback.targets)

    def _count_failure(self, target: Target, exc: AttemptFailed) -> None:
        backend = target.backend
        self.metrics.upstream_errors.labels(backend.name, exc.kind).inc()
        cooled = self.balancer.failed(target.deployment)
        log.warning("attempt at backend %s failed (%s): %s%s", backend.name, exc.kind, exc.message,
                    f"; cooling down for {self.balancer.policy.cooldown:g}s" if cooled else "")

    async def _attempt(self, request: web.Request, record: RequestRecord, target: Target, body: Body,
                       headers: dict[str, str], api_path: str) -> web.StreamResponse:
        backend = target.backend
        headers = {**headers, "X-Request-Id": record.request_id, **backend.headers}
        unit = self.gpu.unit_for(backend, target.upstream_model) if self.gpu is not None else None
        early: web.StreamResponse | None = None
        if unit is not None:
            assert self.gpu is not None
            if record.stream and self.gpu.scheduler.must_wait(unit):
                early = await start_event_stream(request, _response_headers(record))  # keep-alives while waking
            try:
                await self._acquire(unit, early)
            except AttemptFailed as exc:
                if early is None:
                    raise
                return await end_event_stream(early, exc.to_gateway_error(), record)
        gauge = self.metrics.in_flight_gauge(backend.name)
        backend.in_flight += 1
        gauge.inc()
        try:
            return await self._exchange(request, record, target, body, headers, api_path, early)
        except AttemptFailed as exc:
            if early is None:
                raise
            return await end_event_stream(early, exc.to_gateway_error(), record)  # bytes sent: no failover
        finally:
            backend.in_flight -= 1
            gauge.dec()
            if unit is not None:
                assert self.gpu is not None
                self.gpu.scheduler.release(unit)

    async def _exchange(self, request: web.Request, record: RequestRecord, target: Target, body: Body,
                        headers: dict[str, str], api_path: str,
                        early: web.StreamResponse | None) -> web.StreamResponse:
        """One request to the backend and its answer; `early` is a stream already started for keep-alives."""
        backend = target.backend
        upstream: aiohttp.ClientResponse | None = None
        try:
            if backend.engine is not None and not backend.engine.ready.is_set():
                await _engine_ready(backend)
            try:
                upstream = await send(self.session, backend, backend.endpoint(api_path), body, headers)
            except AttemptFailed as exc:
                if exc.kind == "connect" and backend.engine is not None:
                    backend.engine.notice_refused()
                raise
            if upstream.status >= 500:
                raise await _status_failure(upstream, backend.name)
            if upstream.status != 200 or not upstream.content_type.startswith(_STREAMED_TYPES):
                try:
                    data = await upstream.read()
                except TRANSPORT_ERRORS as exc:
                    raise transport_failure(backend, "the response body", exc) from exc
                self.balancer.succeeded(target.deployment)
                if early is not None:
                    raise AttemptFailed("status", f"backend {backend.name} answered HTTP {upstream.status}: "
                                                  f"{data[:300].decode('utf-8', 'replace')}", status=upstream.status)
                return _buffered_response(record, upstream, data)
            try:
                first = await upstream.content.readany()
            except TRANSPORT_ERRORS as exc:
                raise transport_failure(backend, "the first byte", exc) from exc
            if not first:
                raise AttemptFailed("protocol", f"backend {backend.name} ended the stream before any data")
            record.first_byte = time.perf_counter()
            record.stream = True
            self.balancer.succeeded(target.deployment)
            response = early or _stream_response(record, upstream)
            await relay(request, upstream, first, response, record, backend.timeouts.stream_idle)
            return response
        finally:
            if upstream is not None:
                upstream.close()

    async def _acquire(self, unit: Unit, early: web.StreamResponse | None) -> None:
        """Wait until the unit is resident (the scheduler may have to wake it); a refusal may fail over.

        A stream that had to wait gets an SSE comment every keepalive_interval, so proxies in between
        do not cut it while a cold backend loads.
        """
        assert self.gpu is not None
        scheduler = self.gpu.scheduler
        try:
            if early is None:
                await scheduler.acquire(unit)
            else:
                await keep_alive_while(early, scheduler.acquire(unit), scheduler.settings.keepalive_interval,
                                       f"waiting for {unit.key} to wake")
        except GatewayError as exc:
            raise AttemptFailed("connect", exc.message, status=503, retry_after=str(exc.retry_after or 5)) from exc


async def _engine_ready(backend: Backend) -> None:
    """Wait for a managed engine that is (re)starting; a failed one fails the attempt like a refused connect."""
    assert backend.engine is not None
    try:
        await backend.engine.wait_ready(backend.engine.config.startup_timeout)
    except EngineFailed as exc:
        raise AttemptFailed("connect", str(exc)) from exc


async def _status_failure(upstream: aiohttp.ClientResponse, backend: str) -> AttemptFailed:
    try:
        async with asyncio.timeout(5):
            await upstream.content.read(_ERROR_BODY_LIMIT)
    except (TimeoutError, aiohttp.ClientError):
        pass
    return AttemptFailed("status", f"backend {backend} answered HTTP {upstream.status}",
                         status=upstream.status, retry_after=upstream.headers.get("Retry-After"))


def _response_headers(record: RequestRecord) -> dict[str, str]:
    return {"x-request-id": record.request_id, "x-synapse-backend": record.backend or ""}


def _buffered_response(record: RequestRecord, upstream: aiohttp.ClientResponse, data: bytes) -> web.Response:
    record.status = upstream.status
    content_type = upstream.headers.get("Content-Type", "application/json")
    if upstream.status >= 400 and not _is_openai_error(data):
        error = GatewayError(f"backend {record.backend} answered HTTP {upstream.status}: "
                             f"{data[:300].decode('utf-8', 'replace')}", code="upstream_error")
        error.error_type = "invalid_request_error"
        data, content_type = orjson.dumps(error.envelope()), "application/json"
    elif upstream.status == 200 and content_type.startswith("application/json"):
        _record_usage(record, data)
    response = web.Response(body=data, status=upstream.status, headers=_response_headers(record))
    response.headers["Content-Type"] = content_type
    return response


def _stream_response(record: RequestRecord, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    record.status = upstream.status
    response = web.StreamResponse(status=upstream.status, headers=_response_headers(record))
    response.headers["Content-Type"] = upstream.headers.get("Content-Type", "text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    if upstream.content_length is not None:  # a sized audio file keeps its size; streams are chunked
        response.content_length = upstream.content_length
    return response


def _record_usage(record: RequestRecord, data: bytes) -> None:
    start = data.rfind(b'"usage"')
    if start < 0:
        return
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return
    if isinstance(usage, dict):
        record.tokens_in = usage.get("prompt_tokens")
        record.tokens_out = usage.get("completion_tokens")


def _is_openai_error(data: bytes) -> bool:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)

