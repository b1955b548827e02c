"""Reads and validates the audio requests: multipart transcription forms and the speech JSON body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson
from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import InvalidRequest, PayloadTooLarge
from .encode import SPEECH_FORMATS
from .formats import TRANSCRIPT_FORMATS
from .stt import Task, TranscriptionOptions

JSON_BODY_LIMIT = 1024 * 1024
_FIELD_LIMIT = 64 * 1024
_GRANULARITIES = ("segment", "word")
# Far above what aiohttp buffers (a few 100 KiB), so its multipart reader never has to push surplus bytes
# back with StreamReader.unread_data(): that path warns DeprecationWarning, unlike its boundary push-back.
_READ_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TranscriptionForm:
    """A validated /v1/audio/transcriptions or /translations request."""

    model: str
    file: bytes
    response_format: str
    options: TranscriptionOptions


class SpeechRequest(BaseModel):
    """The /v1/audio/speech body; unknown fields (e.g. `instructions`) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio"] = "audio"


_SPEECH_HINTS = {
    "response_format": f"`response_format` must be one of {', '.join(SPEECH_FORMATS)}",
    "stream_format": "only `stream_format: audio` is supported: the audio streams as chunked bytes, not SSE",
}


async def read_transcription_form(request: web.Request, *, task: Task, max_bytes: int) -> TranscriptionForm:
    """Parse the multipart form; 413 as soon as the file passes `max_bytes`, 400 for anything invalid."""
    if request.content_type != "multipart/form-data":
        raise InvalidRequest("send the audio as multipart/form-data with a `file` part and a `model` field",
                             param="file", code="invalid_content_type")
    declared = request.content_length
    if declared is not None and declared > max_bytes + _FIELD_LIMIT:
        raise _too_large(max_bytes)
    fields: dict[str, list[str]] = {}
    upload: bytes | None = None
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("nested multipart bodies are not supported", param="file")
            if part.name == "file":
                upload = await _read_part(part, max_bytes, "file")
            elif part.name:
                value = await _read_part(part, _FIELD_LIMIT, part.name)
                fields.setdefault(part.name, []).append(value.decode("utf-8", errors="replace"))
    except (ValueError, AssertionError) as exc:  # aiohttp's answer to a malformed multipart body
        raise InvalidRequest(f"the multipart body is malformed: {exc}", param="file") from exc
    if upload is None:
        raise InvalidRequest("you must provide a `file` part with the audio", param="file", code="missing_file")
    return _transcription_form(fields, upload, task)


async def _read_part(part: BodyPartReader, limit: int, name: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(_READ_SIZE):
        data += chunk
        if len(data) > limit:
            if name == "file":
                raise _too_large(limit)
            raise InvalidRequest(f"the field `{name}` is longer than {limit} bytes", param=name)
    return bytes(data)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the uploaded file is larger than the limit of {limit} bytes "
                           f"({limit / 2**20:.0f} MiB); split the audio into shorter files", param="file")


def _transcription_form(fields: dict[str, list[str]], upload: bytes, task: Task) -> TranscriptionForm:
    def field(name: str) -> str | None:
        values = fields.get(name)
        return values[-1].strip() if values else None

    model = field("model")
    if not model:
        raise InvalidRequest("you must provide a model parameter, e.g. `model=whisper-1`", param="model",
                             code="missing_model")
    response_format = field("response_format") or "json"
    if response_format not in TRANSCRIPT_FORMATS:
        raise InvalidRequest(f"`response_format` must be one of {', '.join(TRANSCRIPT_FORMATS)}",
                             param="response_format", code="invalid_value")
    granularities = fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", [])
    if any(g not in _GRANULARITIES for g in granularities):
        raise InvalidRequest("`timestamp_granularities` may hold `segment` and `word`",
                             param="timestamp_granularities", code="invalid_value")
    if "word" in granularities and response_format != "verbose_json":
        raise InvalidRequest("word timestamps need `response_format=verbose_json`",
                             param="timestamp_granularities", code="invalid_value")
    options = TranscriptionOptions(task=task, language=field("language") or None, prompt=field("prompt"),
                                   temperature=_temperature(field("temperature")),
                                   word_timestamps="word" in granularities)
    return TranscriptionForm(model=model, file=upload, response_format=response_format, options=options)


def _temperature(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        temperature = float(value)
    except ValueError:
        temperature = -1.0
    if not 0.0 <= temperature <= 1.0:
        raise InvalidRequest("`temperature` must be a number from 0 to 1", param="temperature",
                             code="invalid_value")
    return temperature


async def read_speech_request(request: web.Request, *, max_input_chars: int) -> SpeechRequest:
    """Parse and check the speech body: JSON object, known format, speed 0.25-4.0, 1..max_input_chars of input."""
    declared = request.content_length
    if declared is not None and declared > JSON_BODY_LIMIT:
        raise PayloadTooLarge(f"the request body is larger than {JSON_BODY_LIMIT} bytes")
    try:
        raw = await request.read()
        body = orjson.loads(raw)
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"the request body is larger than {JSON_BODY_LIMIT} bytes") from exc
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    try:
        speech = SpeechRequest.model_validate(body)
    except ValidationError as exc:
        raise _speech_error(exc) from exc
    if not 0.25 <= speech.speed <= 4.0:
        raise InvalidRequest("`speed` must be a number from 0.25 to 4.0", param="speed", code="invalid_value")
    if not speech.input.strip():
        raise InvalidRequest("`input` is empty; give the text to speak", param="input", code="empty_input")
    if len(speech.input) > max_input_chars:
        raise InvalidRequest(f"`input` has {len(speech.input)} characters; the limit is {max_input_chars}, "
                             "so split the text into several requests", param="input", code="input_too_long")
    return speech


def _speech_error(exc: ValidationError) -> InvalidRequest:
    error = exc.errors()[0]
    param = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "missing":
        return InvalidRequest(f"you must provide `{param}`", param=param, code=f"missing_{param}")
    message = _SPEECH_HINTS.get(param or "", f"`{param}`: {error['msg']}")
    return InvalidRequest(message, param=param, code="invalid_value")

