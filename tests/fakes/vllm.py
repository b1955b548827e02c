"""A faithful fake of vLLM's OpenAI-compatible server (`vllm serve`), sleep mode included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from . import _openai as oa
from ._base import FakeBackend, Handler, Refused, json_response
from .faults import Fault, faulty_answer

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
GARBAGE = "\ufffd\ufffd garbage: level-2 weights were never reloaded \ufffd\ufffd"


def error(message: str, status: int, *, err_type: str | None = None, param: str | None = None) -> web.Response:
    """vLLM's ErrorResponse: the OpenAI envelope with an integer ``code``."""
    kind = err_type or HTTPStatus(status).phrase.replace(" ", "") + ("" if status == 500 else "Error")
    return json_response({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


async def not_found(request: web.Request) -> web.Response:
    """FastAPI's answer for a route that does not exist (sleep routes without dev mode)."""
    return json_response({"detail": "Not Found"}, 404)


class FakeVLLM(FakeBackend):
    """One vLLM engine serving ``models`` (aliases of one model), with sleep mode and failure knobs."""

    def __init__(
        self,
        models: Sequence[str] = ("fake-model",),
        *,
        reply: str = "fake reply from {model}",
        stream_chunks: int = 4,
        chunk_delay: float = 0.0,
        sleep_mode: bool = False,
        wake_delay: float = 0.0,
        fail_next_wake: bool = False,
        task: str = "generate",
    ) -> None:
        super().__init__(reply=reply, stream_chunks=stream_chunks, chunk_delay=chunk_delay)
        if not models or task not in ("generate", "embed"):
            raise ValueError("models must be non-empty and task 'generate' or 'embed'")
        self.models = list(models)
        self.sleep_mode = sleep_mode
        self.wake_delay = wake_delay
        self.fail_next_wake = fail_next_wake
        # vllm#15483/#36753: wake_up answers 200, yet the engine fails the first request it gets.
        self.fail_next_canary = False
        self.admin_fault: Fault | None = None  # injected into every sleep-mode route until cleared
        self.task = task
        self.healthy = True
        self.embedding_dim = 8
        self.max_model_len = 4096
        self.created = int(time.time())
        # Engine state and the contract violations a gateway must never commit.
        self.sleeping_tags: set[str] = set()
        self.sleep_level: int | None = None
        self.weights_stale = False
        self.requests_while_sleeping = 0
        self.sleeps_while_busy = 0
        self.requests_with_stale_weights = 0
        self.aborted_requests = 0
        self._sleeps = 0  # each abort-mode sleep aborts the requests admitted before it
        self._ttfts: list[float] = []
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._add_routes()

    @property
    def is_sleeping(self) -> bool:
        return bool(self.sleeping_tags)

    def _add_routes(self) -> None:
        r = self.app.router
        r.add_get("/v1/models", self._list_models)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_get("/health", self._health)
        r.add_get("/metrics", self._metrics)
        admin: list[tuple[str, str, Handler]] = [
            ("POST", "/sleep", self._sleep),
            ("POST", "/wake_up", self._wake_up),
            ("POST", "/collective_rpc", self._collective_rpc),
            ("POST", "/reset_prefix_cache", self._reset_prefix_cache),
            ("GET", "/is_sleeping", self._is_sleeping),
        ]
        for method, path, handler in admin:
            r.add_route(method, path, self._with_faults(handler) if self.sleep_mode else not_found)
        self.app.middlewares.append(_fastapi_404)

    def _hanging(self) -> bool:
        return self.admin_fault == "hang" and not self._stopping

    # -- plain routes ----------------------------------------------------------------------
    async def _list_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card(m) for m in self.models]})

    def _model_card(self, name: str) -> dict[str, Any]:
        perm = {
            "id": oa.new_id("modelperm"),
            "object": "model_permission",
            "created": self.created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.models[0],
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [perm],
        }

    async def _health(self, request: web.Request) -> web.Response:
        # 200 even while asleep: /health is not a sleep indicator, /is_sleeping is.
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        text = _prometheus(self)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- inference -------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "completion")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "embedding")

    async def _inference(self, request: web.Request, kind: str) -> web.StreamResponse:
        async with self._tracked():
            started, admitted = time.monotonic(), self._sleeps
            try:
                body, model = await self._admit(request, kind)
            except Refused as refused:
                return refused.response
            await self._before_first_byte(request)
            if self._sleeps != admitted:
                self.aborted_requests += 1
                return error("Request aborted: the engine was put to sleep (mode=abort)", 500)
            self._ttfts.append(time.monotonic() - started)
            if kind == "embedding":
                out = {
                    "id": oa.new_id("embd"),
                    "created": int(time.time()),
                    **oa.embedding_body(body, model, self.embedding_dim),
                }
                out["usage"] |= {"completion_tokens": 0, "prompt_tokens_details": None}
                return await self._answer(request, out)
            return await self._generate(request, kind, body, model)

    async def _admit(self, request: web.Request, kind: str) -> tuple[dict[str, Any], str]:
        """Checks in the real server's order; raises Refused with the answer it would give."""
        if self.is_sleeping:
            # vllm#15483: a request reaching a sleeping engine can crash it. Record it, answer 500.
            self.requests_while_sleeping += 1
            raise Refused(error("EngineCore encountered an issue: engine is sleeping", 500))
        if self.fail_status is not None:
            raise Refused(error(f"fake engine failure ({self.fail_status})", self.fail_status))
        if self.fail_next_canary:
            self.fail_next_canary = False
            raise Refused(error("EngineCore encountered an issue after wake_up", 500))
        check = {"chat": oa.check_chat, "completion": oa.check_completion, "embedding": oa.check_embedding}
        try:
            body = check[kind](await self._json_body(request))
        except oa.BadRequest as exc:
            raise Refused(error(exc.message, 400, err_type="BadRequestError", param=exc.param)) from None
        model = body.get("model") or self.models[0]
        if model not in self.models:
            raise Refused(error(f"The model `{model}` does not exist.", 404, err_type="NotFoundError", param="model"))
        if (kind == "embedding") != (self.task == "embed"):
            api = {"chat": "Chat Completions", "completion": "Completions", "embedding": "Embeddings"}[kind]
            raise Refused(error(f"The model does not support {api} API", 400, err_type="BadRequestError"))
        return body, model

    async def _generate(self, request: web.Request, kind: str, body: dict[str, Any], model: str) -> web.StreamResponse:
        source = body.get("messages") if kind == "chat" else body.get("prompt")
        reply = self._make_reply(
            model, oa.count_tokens(source), body.get("max_completion_tokens") or body.get("max_tokens")
        )
        if self.weights_stale:
            self.requests_with_stale_weights += 1
            reply.pieces = oa.split_text(GARBAGE, len(reply.pieces))
        self._prompt_tokens += reply.prompt_tokens
        self._generated_tokens += len(reply.pieces)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid, choice = oa.new_id(prefix), {"logprobs": None, "stop_reason": None}
        if not body.get("stream"):
            build = oa.chat_body if kind == "chat" else oa.completion_body
            return await self._answer(request, build(reply, rid, top={}, choice=choice))
        chunks = oa.chat_chunks if kind == "chat" else oa.completion_chunks
        events = chunks(reply, rid, top={}, choice=choice, usage=oa.include_usage(body))
        return await self._stream(request, self._abortable(oa.sse_stream(events)), SSE_HEADERS)

    def _abortable(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        """A stream that an abort-mode sleep ends as vLLM ends a failed stream: an error event, then [DONE]."""
        admitted = self._sleeps
        for frame in frames:
            if self._sleeps != admitted:
                self.aborted_requests += 1
                body = {"error": {"message": "Request aborted: the engine was put to sleep (mode=abort)",
                                  "type": "InternalServerError", "param": None, "code": 500}}
                yield b"data: " + orjson.dumps(body) + b"\n\ndata: [DONE]\n\n"
                return
            yield frame

    # -- sleep mode (VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode) -------------------------
    async def _sleep(self, request: web.Request) -> web.Response:
        # Parameters come from the query string only; a JSON body is ignored, as in vLLM.
        level, mode = request.query.get("level", "1"), request.query.get("mode", "abort")
        if level not in ("1", "2") or mode not in ("abort", "wait"):
            return json_response({"detail": f"invalid sleep parameters level={level!r} mode={mode!r}"}, 422)
        if mode == "wait":
            while self.in_flight and not self._stopping:
                await asyncio.sleep(0.005)
        elif self.in_flight:
            self.sleeps_while_busy += 1  # vllm#28714: sleeping under load can crash the engine
        self._sleeps += 1  # mode=abort (the default) aborts whatever is still running
        if not self.sleeping_tags:
            self.sleeping_tags = {"weights", "kv_cache"}
            self.sleep_level = int(level)
            self.weights_stale = self.weights_stale or level == "2"
        return web.Response(status=200)

    async def _wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", [])
        if self.wake_delay:
            await asyncio.sleep(self.wake_delay)
        if self.fail_next_wake:  # vllm#36753: wake_up can fail with 500 and leave the engine asleep
            self.fail_next_wake = False
            return web.Response(status=500, text="Internal Server Error")
        # Like vLLM's executor: waking an awake engine or an unknown/awake tag is a logged no-op.
        if self.sleeping_tags and all(t in self.sleeping_tags for t in tags):
            self.sleeping_tags -= set(tags) if tags else set(self.sleeping_tags)
        if not self.sleeping_tags:
            self.sleep_level = None
        return web.Response(status=200)

    async def _collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except oa.BadRequest as exc:
            return json_response({"detail": exc.message}, 400)
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            return json_response({"detail": "Missing 'method' in request body"}, 400)
        if method != "reload_weights" or "weights" in self.sleeping_tags:
            # The workers raise (unknown method, or weights not resident): FastAPI answers 500.
            return web.Response(status=500, text="Internal Server Error")
        self.weights_stale = False
        return json_response({"results": [None]})

    def _with_faults(self, handler: Handler) -> Handler:
        async def faulty(request: web.Request) -> web.StreamResponse:
            return await faulty_answer(request, self.admin_fault, self._hanging) or await handler(request)

        return faulty

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        return json_response({"is_sleeping": self.is_sleeping})


@web.middleware
async def _fastapi_404(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return await not_found(request)
    except web.HTTPMethodNotAllowed:
        return json_response({"detail": "Method Not Allowed"}, 405)


def _prometheus(fake: FakeVLLM) -> str:
    """A few of vLLM's real metric names, labelled like vLLM's (model_name, engine)."""
    labels = f'engine="0",model_name="{fake.models[0]}"'
    ttfts = list(fake._ttfts)
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} {float(fake.in_flight)}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} 0.0",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{labels}}} {min(1.0, 0.05 * fake.in_flight)}",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{labels}}} {float(fake._prompt_tokens)}",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{labels}}} {float(fake._generated_tokens)}",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{labels}}} {float(fake._prompt_tokens)}",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{labels}}} 0.0",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]
    for le in (0.01, 0.1, 1.0, 10.0):
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{{labels},le="{le}"}} {sum(t <= le for t in ttfts)}.0')
    lines += [
        f'vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {len(ttfts)}.0',
        f"vllm:time_to_first_token_seconds_count{{{labels}}} {len(ttfts)}.0",
        f"vllm:time_to_first_token_seconds_sum{{{labels}}} {sum(ttfts)}",
        "# TYPE vllm:inter_token_latency_seconds histogram",
        f"vllm:inter_token_latency_seconds_count{{{labels}}} {float(fake._generated_tokens)}",
        f"vllm:inter_token_latency_seconds_sum{{{labels}}} {fake.chunk_delay * fake._generated_tokens}",
    ]
    return "\n".join(lines) + "\n"
