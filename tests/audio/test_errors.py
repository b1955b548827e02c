"""Bad requests get a clear 4xx OpenAI envelope with `param`, and the engine keeps serving afterwards."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.audio.speech import FOX


def _noise(seed: int, size: int) -> bytes:
    """Bytes that are not audio, the same on every run: unseeded noise can, rarely, probe as an MPEG
    stream (frame sync words occur by chance), which made these tests flaky."""
    return random.Random(seed).randbytes(size)


def _error(exc: openai.APIStatusError) -> dict[str, object]:
    body = exc.body
    assert isinstance(body, dict)
    return body


def _assert_still_serving(client: openai.OpenAI) -> None:
    assert len(client.audio.speech.create(model="tts-1", voice="alloy", input="Still here.",
                                          response_format="wav").content) > 1000


@pytest.mark.parametrize(("content", "param", "code"), [
    (b"", "file", "empty_file"),
    (b"this is not audio at all, just text " * 50, "file", "invalid_file_format"),
    (_noise(4096, 4096), "file", "invalid_file_format"),
])
def test_bad_uploads(client: openai.OpenAI, content: bytes, param: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", content))
    error = _error(caught.value)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert "file" in str(error["message"])
    _assert_still_serving(client)


def test_oversized_upload_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * (26 * 1024 * 1024)))
    assert caught.value.status_code == 413
    error = _error(caught.value)
    assert error["param"] == "file" and "26214400 bytes" in str(error["message"])
    _assert_still_serving(client)


def test_unknown_stt_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.transcriptions.create(model="whisper-9", file=("clip.wav", b"RIFF"))
    assert (_error(caught.value)["code"], _error(caught.value)["param"]) == ("model_not_found", "model")


def test_missing_file_and_bad_fields(audio_url: str) -> None:
    with httpx.Client(base_url=audio_url, timeout=30) as http:
        missing = http.post("/v1/audio/transcriptions", files={"model": (None, "whisper-1")})
        bad_format = http.post("/v1/audio/transcriptions", data={"model": "whisper-1", "response_format": "xml"},
                               files={"file": ("a.wav", b"RIFF")})
        bad_temperature = http.post("/v1/audio/transcriptions", data={"model": "whisper-1", "temperature": "hot"},
                                    files={"file": ("a.wav", b"RIFF")})
        not_multipart = http.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    for answer, param in [(missing, "file"), (bad_format, "response_format"), (bad_temperature, "temperature"),
                          (not_multipart, "file")]:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param


def test_translation_with_an_english_only_model_is_400(audio_url: str, client: openai.OpenAI) -> None:
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input=FOX, response_format="wav").content
    with httpx.Client(base_url=audio_url, timeout=30) as http:
        answer = http.post("/v1/audio/translations", data={"model": "whisper-1"}, files={"file": ("a.wav", audio)})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "model" and "English-only" in error["message"]


def test_language_the_model_does_not_know_is_400(client: openai.OpenAI) -> None:
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input=FOX, response_format="wav").content
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), language="fr")
    assert _error(caught.value)["param"] == "language"


@pytest.mark.parametrize(("change", "param", "needle"), [
    ({"voice": "nova"}, "voice", "alloy, joe"),
    ({"input": ""}, "input", "empty"),
    ({"input": "   "}, "input", "empty"),
    ({"input": "a" * 4097}, "input", "4096"),
    ({"speed": 0.1}, "speed", "0.25 to 4.0"),
    ({"speed": 5}, "speed", "0.25 to 4.0"),
    ({"response_format": "ogg"}, "response_format", "mp3, opus, aac, flac, wav, pcm"),
    ({"stream_format": "sse"}, "stream_format", "not SSE"),
])
def test_bad_speech_requests(client: openai.OpenAI, change: dict[str, object], param: str, needle: str) -> None:
    body: dict[str, object] = {"model": "tts-1", "voice": "alloy", "input": FOX, **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/audio/speech", body=body, cast_to=httpx.Response)
    error = _error(caught.value)
    assert error["param"] == param and needle in str(error["message"]), error
    _assert_still_serving(client)


def test_unknown_speech_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.speech.create(model="tts-9", voice="alloy", input=FOX)
    assert _error(caught.value)["code"] == "model_not_found"


def test_speech_body_must_be_json(audio_url: str) -> None:
    with httpx.Client(base_url=audio_url, timeout=30) as http:
        answer = http.post("/v1/audio/speech", content=b"{not json")
        missing = http.post("/v1/audio/speech", json={"model": "tts-1", "input": "hi"})
        route = http.get("/v1/audio/nothing")
        method = http.get("/v1/audio/speech")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "voice"
    assert route.status_code == 404 and method.status_code == 405
    assert answer.headers["x-request-id"]


def test_many_uploads_in_odd_sizes_all_get_their_400(audio_url: str) -> None:
    """Regression: small multipart reads made aiohttp push bytes back with a deprecated call (a 500 here)."""

    def upload(index: int) -> int:
        with httpx.Client(base_url=audio_url, timeout=60) as http:
            answer = http.post("/v1/audio/transcriptions", data={"model": "whisper-1", "prompt": "p" * (index % 300)},
                               files={"file": ("a.wav", _noise(index, 1000 + index * 3717 % 300_000))})
            return answer.status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(upload, range(160))) == {400}
