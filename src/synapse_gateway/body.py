"""Reads a JSON request body within the size limit and checks the fields the gateway needs."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .errors import InvalidRequest, PayloadTooLarge


async def read_json_body(request: web.Request, limit: int) -> tuple[dict[str, Any], bytes]:
    """The parsed body and its raw bytes; 413 is decided from Content-Length before reading anything."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes") from exc
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter, e.g. \"model\": \"llama-3.2-8b\"",
                             param="model", code="missing_model" if model is None else "invalid_model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false", param="stream", code="invalid_type")
    return payload, raw
