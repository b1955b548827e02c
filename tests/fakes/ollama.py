"""A faithful fake of an Ollama server: native /api (NDJSON streams, load/unload) and its /v1 routes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from . import _openai as oa
from ._base import FakeBackend, Handler, Refused, json_response
from ._ollama_models import ModelStore, full_name, parse_keep_alive, rfc3339
from .faults import Fault, faulty_answer

NDJSON = {"Content-Type": "application/x-ndjson"}
SSE = {"Content-Type": "text/event-stream"}
OA_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
Json = dict[str, Any]
ErrorFn = Callable[[str, int], Refused]


def native_error(message: str, status: int) -> Refused:
    return Refused(json_response({"error": message}, status, "application/json"))


def openai_error(message: str, status: int) -> Refused:
    body = {"message": message, "type": OA_TYPES.get(status, "api_error"), "param": None, "code": None}
    return Refused(json_response({"error": body}, status))


class FakeOllama(FakeBackend):
    """An Ollama server holding ``models`` locally; requests load them, keep_alive unloads them."""

    def __init__(
        self,
        models: Sequence[str] | Mapping[str, int] = ("llama3.2:1b",),
        *,
        embedding_models: Sequence[str] = (),
        reply: str = "fake reply from {model}",
        stream_chunks: int = 4,
        chunk_delay: float = 0.0,
        max_loaded_models: int = 3,
        keep_alive: float = 300.0,
        load_delay: float = 0.0,
    ) -> None:
        super().__init__(reply=reply, stream_chunks=stream_chunks, chunk_delay=chunk_delay)
        # Knobs. OLLAMA_NUM_PARALLEL: requests served at once per model (None: no limit, unlike Ollama's
        # default of 1, so tests that do not care see no queueing). OLLAMA_MAX_QUEUE: requests waiting
        # beyond it are refused with 503.
        self.num_parallel: int | None = None
        self.max_queue = 512
        self.queued = 0
        self.max_served_at_once = 0
        self._serving: dict[str, int] = {}
        self.admin_fault: Fault | None = None  # injected into /api/ps and load/unload requests until cleared
        self.store = ModelStore(models, embedding=embedding_models, max_loaded=max_loaded_models, load_delay=load_delay)
        self.keep_alive = keep_alive  # OLLAMA_KEEP_ALIVE, seconds
        self.version = "0.12.6"
        self.embedding_dim = 8
        self._add_routes()

    @property
    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first (expired ones left out)."""
        return self.store.resident()

    @property
    def loads(self) -> list[str]:
        return self.store.loads

    @property
    def unloads(self) -> list[str]:
        return self.store.unloads

    def _add_routes(self) -> None:
        r = self.app.router
        r.add_get("/", self._root)
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps)
        r.add_post("/api/show", self._show)
        for kind in ("chat", "generate", "embed", "embeddings"):
            r.add_post(f"/api/{kind}", self._native_route(kind))
        r.add_get("/v1/models", self._v1_models)
        r.add_get("/v1/models/{model:.+}", self._v1_model)
        for path, kind in (
            ("chat/completions", "chat"),
            ("completions", "completion"),
            ("embeddings", "embedding"),
        ):
            r.add_post(f"/v1/{path}", self._v1_route(kind))
        self.app.middlewares.append(_gin_404)

    def _hanging(self) -> bool:
        return self.admin_fault == "hang" and not self._stopping

    # -- metadata --------------------------------------------------------------------------
    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.version})

    async def _tags(self, request: web.Request) -> web.Response:
        return json_response({"models": [self.store.tag(m) for m in self.store.sizes]})

    async def _ps(self, request: web.Request) -> web.StreamResponse:
        fault = await faulty_answer(request, self.admin_fault, self._hanging)
        return fault or json_response({"models": self.store.ps()})

    async def _show(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
        except oa.BadRequest as exc:
            return json_response({"error": exc.message}, 400)
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return json_response({"error": "model is required"}, 400)
        if not self.store.knows(name):
            return json_response({"error": f"model '{name}' not found"}, 404)
        return json_response(self._show_body(full_name(name)))

    def _show_body(self, name: str) -> Json:
        details = self.store.details(name)
        arch = details["family"]
        info = {
            "general.architecture": arch,
            "general.parameter_count": self.store.sizes[name] * 2,
            f"{arch}.context_length": 131072,
            f"{arch}.embedding_length": self.embedding_dim,
        }
        return {
            "license": "",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
            "parameters": 'stop "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": details,
            "model_info": info,
            "capabilities": [self._capability(name)],
            "modified_at": rfc3339(self.store.modified),
        }

    def _capability(self, name: str) -> str:
        return "embedding" if self.store.is_embedding(name) else "completion"

    async def _v1_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._v1_card(m) for m in self.store.sizes]})

    async def _v1_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if not self.store.knows(name):
            return openai_error(f"model '{name}' not found", 404).response
        return json_response(self._v1_card(name))

    def _v1_card(self, name: str) -> Json:
        return {"id": name, "object": "model", "created": int(self.store.modified), "owned_by": "library"}

    # -- admission shared by both APIs -----------------------------------------------------
    async def _admit(self, request: web.Request, kind: str, err: ErrorFn, check: Callable[[Any], Any]) -> Json:
        if self.fail_status is not None:
            raise err(f"fake server failure ({self.fail_status})", self.fail_status)
        try:
            body = check(await self._json_body(request))
        except oa.BadRequest as exc:
            raise err(exc.message, 400) from None
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise err("model is required", 400)
        if not self.store.knows(name):
            raise err(f"model '{name}' not found", 404)
        if kind in ("chat", "generate", "completion") and self.store.is_embedding(name):
            raise err(f'"{name}" does not support {"chat" if kind == "chat" else "generate"}', 400)
        return {**body, "model": name}  # the legacy "name" field is accepted as "model"

    # -- OLLAMA_NUM_PARALLEL and OLLAMA_MAX_QUEUE ----------------------------------------------
    @asynccontextmanager
    async def _slot(self, model: str, err: ErrorFn) -> AsyncIterator[None]:
        """Hold one of the model's parallel slots; past `max_queue` waiting requests, Refused with 503."""
        name = full_name(model)
        if self.num_parallel is not None and self._serving.get(name, 0) >= self.num_parallel:
            if self.queued >= self.max_queue:
                raise err("server busy, please try again.  maximum pending requests exceeded", 503)
            self.queued += 1
            try:
                while self._serving.get(name, 0) >= self.num_parallel:
                    await asyncio.sleep(0.002)
            finally:
                self.queued -= 1
        self._serving[name] = self._serving.get(name, 0) + 1
        self.max_served_at_once = max(self.max_served_at_once, self._serving[name])
        try:
            yield
        finally:
            self._serving[name] -= 1

    # -- native API ------------------------------------------------------------------------
    def _native_route(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            async with self._tracked():
                try:
                    body = await self._admit(request, kind, native_error, _native_check(kind))
                    keep = parse_keep_alive(body.get("keep_alive"), self.keep_alive)
                except ValueError as exc:
                    return json_response({"error": str(exc)}, 400)
                except Refused as refused:
                    return refused.response
                return await self._native(request, kind, body, keep)

        return handler

    async def _native(self, request: web.Request, kind: str, body: Json, keep: float) -> web.StreamResponse:
        started, name = time.monotonic(), body["model"]
        if _load_only(kind, body):
            fault = await faulty_answer(request, self.admin_fault, self._hanging)
            return fault or await self._load_or_unload(kind, body, keep)
        await self._before_first_byte(request)
        try:
            async with self._slot(name, native_error):
                return await self._native_answer(request, kind, body, keep, started)
        except Refused as refused:
            return refused.response

    async def _native_answer(self, request: web.Request, kind: str, body: Json, keep: float,
                             started: float) -> web.StreamResponse:
        name = body["model"]
        load_ns = await self.store.acquire(name, keep_alive=keep, num_ctx=_options(body).get("num_ctx"))
        try:
            if kind in ("embed", "embeddings"):
                return await self._answer(request, self._native_embedding(kind, body, started, load_ns))
            source = body.get("messages") if kind == "chat" else body.get("prompt")
            reply = self._make_reply(name, oa.count_tokens(source), _options(body).get("num_predict"))
            frames = _NativeFrames(kind, reply, started, load_ns)
            if body.get("stream", True):  # the native API streams unless told not to
                return await self._stream(request, frames.ndjson(), NDJSON)
            return await self._answer(request, frames.final(reply.text))
        finally:
            self.store.release(name, keep_alive=keep)

    async def _load_or_unload(self, kind: str, body: Json, keep: float) -> web.Response:
        name = body["model"]
        if keep == 0:
            self.store.unload(name)
            reason = "unload"
        else:
            await self.store.acquire(name, keep_alive=keep)
            self.store.release(name, keep_alive=keep)
            reason = "load"
        out: Json = {"model": name, "created_at": rfc3339(time.time())}
        out |= {"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""}
        return json_response(out | {"done_reason": reason, "done": True})

    def _native_embedding(self, kind: str, body: Json, started: float, load_ns: int) -> Json:
        if kind == "embeddings":  # legacy: one prompt, one vector
            prompt = body.get("prompt") or ""
            return {"embedding": oa.embed_text(prompt, self.embedding_dim) if prompt else []}
        items = body.get("input") or []
        items = [items] if isinstance(items, str) else items
        took = time.monotonic_ns() - int(started * 1e9)
        return {
            "model": body["model"],
            "embeddings": [oa.embed_text(i, self.embedding_dim) for i in items],
            "total_duration": max(took, load_ns + 1),
            "load_duration": load_ns,
            "prompt_eval_count": oa.count_tokens(items),
        }

    # -- OpenAI-compatible API -------------------------------------------------------------
    def _v1_route(self, kind: str) -> Handler:
        checks = {"chat": _v1_chat_check, "completion": oa.check_completion, "embedding": oa.check_embedding}

        async def handler(request: web.Request) -> web.StreamResponse:
            async with self._tracked():
                try:
                    body = await self._admit(request, kind, openai_error, checks[kind])
                except Refused as refused:
                    return refused.response
                await self._before_first_byte(request)
                try:
                    async with self._slot(body["model"], openai_error):
                        await self.store.acquire(body["model"], keep_alive=self.keep_alive)
                        try:
                            return await self._v1(request, kind, body)
                        finally:
                            self.store.release(body["model"], keep_alive=self.keep_alive)
                except Refused as refused:
                    return refused.response

        return handler

    async def _v1(self, request: web.Request, kind: str, body: Json) -> web.StreamResponse:
        model = body["model"]
        if kind == "embedding":
            return await self._answer(request, oa.embedding_body(body, model, self.embedding_dim))
        source = body.get("messages") if kind == "chat" else body.get("prompt")
        reply = self._make_reply(model, oa.count_tokens(source), body.get("max_tokens"))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{random.randint(0, 999)}"  # Ollama's style
        top = {"system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            build = oa.chat_body if kind == "chat" else oa.completion_body
            return await self._answer(request, build(reply, rid, top=top, choice={}))
        chunks = oa.chat_chunks if kind == "chat" else oa.completion_chunks
        events = chunks(reply, rid, top=top, choice={}, usage=oa.include_usage(body))
        return await self._stream(request, oa.sse_stream(events), SSE)


class _NativeFrames:
    """The NDJSON objects of one native chat/generate answer; the last carries done and counters."""

    def __init__(self, kind: str, reply: oa.Reply, started: float, load_ns: int) -> None:
        self.kind, self.reply, self.started, self.load_ns = kind, reply, started, load_ns

    def _piece(self, text: str) -> Json:
        head: Json = {"model": self.reply.model, "created_at": rfc3339(time.time())}
        if self.kind == "chat":
            return head | {"message": {"role": "assistant", "content": text}}
        return head | {"response": text}

    def ndjson(self) -> Iterator[bytes]:
        for piece in self.reply.pieces:
            yield orjson.dumps(self._piece(piece) | {"done": False}) + b"\n"
        yield orjson.dumps(self.final("")) + b"\n"

    def final(self, text: str) -> Json:
        total = max(time.monotonic_ns() - int(self.started * 1e9), self.load_ns + 3)
        prompt_ns = 1_000 * (self.reply.prompt_tokens + 1)
        out = self._piece(text) | {"done": True, "done_reason": self.reply.finish_reason}
        if self.kind == "generate":
            out["context"] = list(range(1, self.reply.prompt_tokens + len(self.reply.pieces) + 1))
        return out | {
            "total_duration": total,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.reply.prompt_tokens,
            "prompt_eval_duration": prompt_ns,
            "eval_count": len(self.reply.pieces),
            "eval_duration": max(total - self.load_ns - prompt_ns, 1),
        }


def _options(body: Json) -> Json:
    options = body.get("options")
    return options if isinstance(options, dict) else {}


def _load_only(kind: str, body: Json) -> bool:
    """A chat without messages or a generate without prompt only loads (or, keep_alive 0, unloads)."""
    return (kind == "chat" and not body.get("messages")) or (kind == "generate" and not body.get("prompt"))


def _native_check(kind: str) -> Callable[[Any], Json]:
    fields = {
        "chat": ("messages", list),
        "generate": ("prompt", str),
        "embed": ("input", str | list),
        "embeddings": ("prompt", str),
    }
    key, typ = fields[kind]

    def check(body: Any) -> Json:
        if not isinstance(body, dict):
            raise oa.BadRequest("invalid request body")
        if body.get(key) is not None and not isinstance(body[key], typ):
            raise oa.BadRequest(f"invalid {key}: wrong type", key)
        if not isinstance(body.get("stream", True), bool):
            raise oa.BadRequest("invalid stream: expected a boolean", "stream")
        return body

    return check


def _v1_chat_check(body: Any) -> Json:
    return oa.check_chat(body, model_required=True, allow_empty=False)


@web.middleware
async def _gin_404(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return web.Response(status=404, text="404 page not found")
