"""The attempt loop: tries a resolution's targets in the balancer's order, failing over, then relays the answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import aiohttp
import orjson
from aiohttp import web

from ..accesslog import RequestRecord
from ..balancer import Balancer, Target
from ..body import BodyFor
from ..errors import BackendClosed, BadGateway, GatewayError
from ..metrics import Metrics
from ..routing import Resolution
from ..web.errors import STARTED
from .admission import Admission
from .relay import end_event_stream, event_stream_response, record_usage, relay
from .upstream import NOT_AN_ANSWER as _NOT_AN_ANSWER
from .upstream import TRANSPORT_ERRORS, client_error, read_capped, send, status_error, upstream_error

log = logging.getLogger("synapse.proxy")
# Answers relayed chunk by chunk as they arrive; anything else (JSON, text) is read whole first.
_STREAMED_TYPES = ("text/event-stream", "audio/", "application/octet-stream")


class _Answer:
    """The client's side of one request: an event stream may start early, to send keep-alives while waiting.

    Keep-alives are SSE comments, so until the first data event another deployment can still answer
    into the same stream; after it, nothing can fail over.
    """

    def __init__(self, request: web.Request, record: RequestRecord) -> None:
        self.request = request
        self.record = record
        self.response: web.StreamResponse | None = None

    async def heartbeat(self, note: str) -> None:
        if self.response is None:
            self.response = event_stream_response(_response_headers(self.record))
            await self.response.prepare(self.request)
            self.request[STARTED] = True
        await self.response.write(f": {note}\n\n".encode())

    async def fail(self, error: GatewayError) -> web.StreamResponse:
        """End the request with `error`: raised while nothing is sent, else as the stream's last event."""
        if self.response is None:
            raise error
        return await end_event_stream(self.request, self.response, error, self.record)


class Proxy:
    """Sends requests to backends; owns nothing but references to the app's shared parts."""

    def __init__(self, session: aiohttp.ClientSession, balancer: Balancer, metrics: Metrics,
                 admission: Admission, *, max_response_size: int) -> None:
        self.session = session
        self.balancer = balancer
        self.metrics = metrics
        self.admission = admission
        self.max_response_size = max_response_size

    async def forward(self, request: web.Request, record: RequestRecord, resolution: Resolution, *,
                      body_for: BodyFor, api_path: str,
                      allows: Callable[[str], bool] | None = None) -> web.StreamResponse:
        """Try the resolution's targets (then its fallback models' targets) until one answers.

        `allows` (a key's model permission, already granted for the resolution's own model) is asked
        before each fallback model is tried, so that no fallback serves a model the key may not use.

        A failure that is not `retryable` (the client's mistake) ends the loop. A target that failed
        after the request reached it, or whose GPU wait was refused, is not tried again: a refused
        connection may be retried on the same deployment, and a connection closed before any answer
        once.
        """
        answer = _Answer(request, record)
        failure: GatewayError | None = None
        spent: set[int] = set()  # deployments not to try again for this request
        closed: set[int] = set()  # deployments that closed a connection without answering, once
        for target in self._plan(resolution, allows):
            key = id(target.deployment)
            if key in spent:
                continue
            if failure is not None:
                if not body_for.replayable:
                    break
                record.retries += 1
                self.metrics.retries.labels(resolution.route, target.backend.name).inc()
            record.backend, record.upstream_model = target.backend.name, target.upstream_model
            try:
                return await self._attempt(record, target, body_for, api_path, answer)
            except GatewayError as exc:
                if not exc.retryable:
                    return await answer.fail(exc)
                failure = exc
                self._count_failure(target, exc)
                if not exc.repeatable:
                    spent.add(key)
                elif isinstance(exc, BackendClosed):
                    (spent if key in closed else closed).add(key)
                else:
                    self.admission.refused(target)
        assert failure is not None, "a resolution always has at least one target"
        return await answer.fail(failure)

    def _plan(self, resolution: Resolution, allows: Callable[[str], bool] | None) -> Iterator[Target]:
        yield from self.balancer.attempts(resolution.targets, waits=self.admission.must_wait)
        for fallback in resolution.fallbacks:
            if allows is not None and not allows(fallback.model):
                log.info("model %s: fallback %s is not allowed for this key", resolution.model, fallback.model)
                continue
            log.info("model %s failed on every deployment; falling back to %s", resolution.model, fallback.model)
            yield from self.balancer.attempts(fallback.targets, waits=self.admission.must_wait)

    def _count_failure(self, target: Target, exc: GatewayError) -> None:
        backend = target.backend
        refused = exc.repeatable and not isinstance(exc, BackendClosed)
        kind = "connect" if refused else exc.code  # refused connections apart from all else
        self.metrics.upstream_errors.labels(backend.name, kind).inc()
        cooled = self.balancer.failed(target.deployment)
        log.warning("attempt at backend %s failed (%s): %s%s", backend.name, exc.code, exc.message,
                    f"; cooling down for {self.balancer.policy.cooldown:g}s" if cooled else "")

    async def _attempt(self, record: RequestRecord, target: Target, body_for: BodyFor, api_path: str,
                       answer: _Answer) -> web.StreamResponse:
        backend = target.backend
        async with self.admission.hold(target, answer.heartbeat if record.stream else None):
            body, headers = body_for(target.upstream_model)
            headers = {**headers, "X-Request-Id": record.request_id, **backend.headers}
            gauge = self.metrics.in_flight_gauge(backend.name)
            backend.in_flight += 1
            gauge.inc()
            try:
                upstream = await send(self.session, backend, backend.endpoint(api_path), body, headers)
                try:
                    return await self._answer(upstream, record, target, answer)
                finally:
                    upstream.close()
            finally:
                backend.in_flight -= 1
                gauge.dec()

    async def _answer(self, upstream: aiohttp.ClientResponse, record: RequestRecord, target: Target,
                      answer: _Answer) -> web.StreamResponse:
        """Relay what the backend answered, or raise the error it amounts to."""
        backend = target.backend
        content_type = upstream.content_type
        if upstream.status != 200 or content_type.startswith(_NOT_AN_ANSWER):  # the usual 200 skips this
            error = await status_error(upstream, backend)
            if error is not None:
                raise error
        if upstream.status != 200 or not content_type.startswith(_STREAMED_TYPES):
            data = await read_capped(upstream, backend, self.max_response_size)
            rejected = client_error(upstream.status, data, backend) if upstream.status >= 400 else None
            if rejected is not None:
                raise rejected
            self.balancer.succeeded(target.deployment)
            if answer.response is not None:
                return await _into_started_stream(answer, upstream.status, data)
            return _buffered_response(record, upstream, data)
        try:
            first = await upstream.content.readany()
        except TRANSPORT_ERRORS as exc:
            raise upstream_error(backend, "the first byte", exc) from exc
        if not first:
            raise BadGateway(f"backend {backend.name} ended the stream before any data")
        record.first_byte = time.perf_counter()
        record.stream = True
        record.status = upstream.status
        self.balancer.succeeded(target.deployment)
        response = answer.response or _stream_response(record, upstream)
        await relay(answer.request, upstream, first, response, record, backend)
        return response


async def _into_started_stream(answer: _Answer, status: int, data: bytes) -> web.StreamResponse:
    """A whole answer for a stream that already sent keep-alives: a backend's error envelope is its last event."""
    if status >= 400:
        answer.record.error = f"backend answered HTTP {status}"
        assert answer.response is not None
        answer.record.status = 200
        await answer.response.write(b"data: " + orjson.dumps(orjson.loads(data)) + b"\n\n")
        await answer.response.write_eof()
        return answer.response
    return await answer.fail(BadGateway("the backend answered a stream request with a whole (non-stream) answer"))


def _response_headers(record: RequestRecord) -> dict[str, str]:
    headers = {"x-request-id": record.request_id, "x-synapse-backend": record.backend or ""}
    if record.rate is not None:  # the key's x-ratelimit-* state, set with the head (not patched in after)
        headers.update(record.rate)
    return headers


def _buffered_response(record: RequestRecord, upstream: aiohttp.ClientResponse, data: bytes) -> web.Response:
    record.status = upstream.status
    content_type = upstream.headers.get("Content-Type", "application/json")
    encoding = upstream.headers.get("Content-Encoding")
    if upstream.status == 200 and content_type.startswith("application/json") and not encoding:
        _record_usage(record, data)
    response = web.Response(body=data, status=upstream.status, headers=_response_headers(record))
    response.headers["Content-Type"] = content_type
    if encoding:  # sent despite `Accept-Encoding: identity`: the client decodes it
        response.headers["Content-Encoding"] = encoding
    return response


def _stream_response(record: RequestRecord, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    if upstream.content_type == "text/event-stream":
        response = event_stream_response(_response_headers(record), upstream.status)
    else:
        response = web.StreamResponse(status=upstream.status, headers=_response_headers(record))
        response.headers["Content-Type"] = upstream.headers.get("Content-Type", "application/octet-stream")
    if upstream.headers.get("Content-Encoding"):
        response.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
    if upstream.content_length is not None:  # a sized audio file keeps its size; streams are chunked
        response.content_length = upstream.content_length
    return response


def _record_usage(record: RequestRecord, data: bytes) -> None:
    if data.rfind(b'"usage"') < 0:
        return
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(body, dict):
        record_usage(record, body.get("usage"))
