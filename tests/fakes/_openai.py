"""OpenAI wire format shared by the fakes: request validation, bodies, chunks and SSE frames."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"
Json = dict[str, Any]


class BadRequest(Exception):
    """A request the real server rejects with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class Reply:
    """What the fake engine 'generates' for one request."""

    model: str
    pieces: list[str]
    prompt_tokens: int
    finish_reason: str = "stop"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self, **extra: Any) -> Json:
        done = len(self.pieces)
        total = self.prompt_tokens + done
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": total,
            "completion_tokens": done,
            **extra,
        }


def sse(obj: Json) -> bytes:
    """One server-sent event frame."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_stream(events: Iterator[Json]) -> Iterator[bytes]:
    """The SSE frames of ``events``, closed by ``data: [DONE]``."""
    for event in events:
        yield sse(event)
    yield SSE_DONE


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def split_text(text: str, n: int) -> list[str]:
    """Split ``text`` into ``n`` consecutive pieces (some may be empty) that join back to it."""
    n = max(n, 1)
    return [text[i * len(text) // n : (i + 1) * len(text) // n] for i in range(n)]


def count_tokens(value: Any) -> int:
    """A deterministic token count: words of text, items of token-id lists, text parts of content."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(1 if isinstance(v, int) else count_tokens(v) for v in value)
    if isinstance(value, dict):
        return count_tokens(value.get("text", value.get("content", "")))
    return 0


def embed_text(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from ``text``."""
    raw = b"".join(hashlib.sha256(f"{text}:{i}".encode()).digest() for i in range(dim // 8 + 1))
    vec = [b / 127.5 - 1.0 for b in raw[:dim]]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def encode_vector(vec: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec


def embedding_inputs(value: Any) -> list[Any]:
    """Split an ``input`` field into its items, as the OpenAI API defines it."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [value]
        if all(isinstance(v, str) or _is_token_list(v) for v in value):
            return value
    raise BadRequest("'input' must be a non-empty string, list of strings or list of token ids", "input")


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _common_checks(body: Json, *, model_required: bool) -> None:
    model = body.get("model")
    if (model_required and model is None) or (model is not None and not isinstance(model, str)):
        raise BadRequest("'model' must be a string", "model")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise BadRequest("Stream options can only be defined when `stream=True`.", "stream_options")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadRequest(f"{key} must be at least 1, got {value}.", key)


def check_chat(body: Any, *, model_required: bool = False, allow_empty: bool = True) -> Json:
    """Validate a chat completion request; returns it as a dict or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("Field required: 'messages'", "messages")
    if not isinstance(messages, list) or (not messages and not allow_empty):
        raise BadRequest(f"{messages!r} is too short - 'messages'", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
    _common_checks(body, model_required=model_required)
    return body


def check_completion(body: Any, *, model_required: bool = False) -> Json:
    """Validate a (legacy) completion request."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
        raise BadRequest("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    _common_checks(body, model_required=model_required)
    return body


def check_embedding(body: Any, *, model_required: bool = False) -> Json:
    """Validate an embeddings request."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    embedding_inputs(body.get("input"))
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    _common_checks(body, model_required=model_required)
    return body


def include_usage(body: Json) -> bool:
    options = body.get("stream_options") or {}
    return bool(isinstance(options, dict) and options.get("include_usage"))


def chat_body(reply: Reply, rid: str, *, top: Json, choice: Json) -> Json:
    message = {"role": "assistant", "content": reply.text}
    first = {"index": 0, "message": message, **choice, "finish_reason": reply.finish_reason}
    head = {"id": rid, "object": "chat.completion", "created": reply.created, "model": reply.model}
    return {**head, "choices": [first], **top, "usage": reply.usage()}


def chat_chunks(reply: Reply, rid: str, *, top: Json, choice: Json, usage: bool) -> Iterator[Json]:
    """Chunks of a streamed chat completion: role, one per piece (finish on the last), usage."""
    head = {"id": rid, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model}
    deltas: list[Json] = [{"role": "assistant", "content": ""}] + [{"content": p} for p in reply.pieces]
    for i, delta in enumerate(deltas):
        finish = reply.finish_reason if i == len(deltas) - 1 else None
        yield {**head, "choices": [{"index": 0, "delta": delta, **choice, "finish_reason": finish}], **top}
    if usage:
        yield {**head, "choices": [], **top, "usage": reply.usage()}


def completion_body(reply: Reply, rid: str, *, top: Json, choice: Json) -> Json:
    first = {"index": 0, "text": reply.text, **choice, "finish_reason": reply.finish_reason}
    head = {"id": rid, "object": "text_completion", "created": reply.created, "model": reply.model}
    return {**head, "choices": [first], **top, "usage": reply.usage()}


def completion_chunks(reply: Reply, rid: str, *, top: Json, choice: Json, usage: bool) -> Iterator[Json]:
    head = {"id": rid, "object": "text_completion", "created": reply.created, "model": reply.model}
    for i, piece in enumerate(reply.pieces):
        finish = reply.finish_reason if i == len(reply.pieces) - 1 else None
        yield {**head, "choices": [{"index": 0, "text": piece, **choice, "finish_reason": finish}], **top}
    if usage:
        yield {**head, "choices": [], **top, "usage": reply.usage()}


def embedding_body(body: Json, model: str, dim: int) -> Json:
    """An embeddings response for a validated request (without the server-specific extras)."""
    items = embedding_inputs(body["input"])
    fmt = body.get("encoding_format") or "float"
    data = [
        {"index": i, "object": "embedding", "embedding": encode_vector(embed_text(str(item), dim), fmt)}
        for i, item in enumerate(items)
    ]
    tokens = count_tokens(items)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
