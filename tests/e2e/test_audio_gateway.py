"""Audio through the gateway: speech streamed back, uploads streamed through, routed and renamed by model."""

from __future__ import annotations

import io
import os
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from synapse_gateway.audio import create_audio_app
from tests.audio.conftest import packaged_config
from tests.audio.speech import assert_streamed, post_chunked
from tests.conftest import GatewayFactory
from tests.e2e.test_usage import rows_of
from tests.fakes.server import BackgroundServer
from tests.gateway_harness import ThreadGateway

pytestmark = pytest.mark.engine
SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def audio_engine() -> Iterator[str]:
    with BackgroundServer(create_audio_app(packaged_config())) as server:
        yield server.url


@pytest.fixture
def gw(start_gateway: GatewayFactory, audio_engine: str) -> ThreadGateway:
    return start_gateway({
        "backends": {"audio": {"url": audio_engine, "discover": True, "health_path": "/health"}},
        "routes": [{"model": "house-stt", "backend": "audio", "upstream": "whisper-tiny.en"}],
        "server": {"max_upload_size": "1MB"},
    })


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture
def spoken(gw: ThreadGateway) -> bytes:
    with gw.client() as client, client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCE, response_format="wav") as answer:
        assert answer.headers["x-synapse-backend"] == "audio"
        return answer.read()


def test_speech_round_trip_through_the_gateway(gw: ThreadGateway, spoken: bytes) -> None:
    with wave.open(io.BytesIO(spoken)) as wav:
        assert wav.getnframes() / wav.getframerate() > 1.0
    with gw.client() as client:
        text = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken, "audio/wav"))
    assert _words(text.text) == _words(SENTENCE)


def test_a_renamed_model_is_rewritten_inside_the_upload(gw: ThreadGateway, spoken: bytes) -> None:
    with gw.client() as client:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="house-stt", file=("fox.wav", spoken, "audio/wav"), response_format="text")
    assert raw.headers["x-synapse-backend"] == "audio"
    assert "fox" in raw.text.lower()
    assert gw.access_lines()[-1]["upstream_model"] == "whisper-tiny.en"


def test_model_after_the_file_and_chunked_uploads_are_routed(gw: ThreadGateway, spoken: bytes) -> None:
    files = [("file", ("fox.wav", spoken, "audio/wav")), ("model", (None, "whisper-1"))]
    with gw.http() as http:
        answer = http.post("/v1/audio/transcriptions", files=files)
        assert answer.status_code == 200, answer.text
        assert "fox" in answer.json()["text"].lower()
        request = http.build_request("POST", "/v1/audio/transcriptions", files=files)
        body = request.read()
        chunked = http.post("/v1/audio/transcriptions", headers={"Content-Type": request.headers["content-type"]},
                            content=iter([body[:1000], body[1000:]]))
    assert chunked.status_code == 200, chunked.text


def test_upload_errors(gw: ThreadGateway, spoken: bytes) -> None:
    with gw.http() as http:
        too_big = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"0" * 1_200_000)},
                            data={"model": "whisper-1"})
        not_multipart = http.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
        no_model = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", spoken)})
        not_audio = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"not audio at all")},
                              data={"model": "whisper-1"})
        empty = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"")}, data={"model": "whisper-1"})
        unknown_voice = http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "nobody", "input": "Hi"})
        still_fine = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", spoken)},
                               data={"model": "whisper-1"})
    assert too_big.status_code == 413
    assert (not_multipart.status_code, not_multipart.json()["error"]["param"]) == (400, "file")
    assert (no_model.status_code, no_model.json()["error"]["param"]) == (400, "model")
    assert not_audio.status_code == 400 and not_audio.json()["error"]["param"] == "file"
    assert empty.status_code == 400
    assert unknown_voice.status_code == 400 and unknown_voice.json()["error"]["param"] == "voice"
    assert still_fine.status_code == 200


def test_audio_models_are_listed(gw: ThreadGateway) -> None:
    with gw.client() as client:
        ids = {m.id for m in client.models.list()}
    assert {"whisper-tiny.en", "house-stt"} <= ids


def test_unknown_audio_model_is_404(gw: ThreadGateway) -> None:
    with gw.client() as client, pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="no-such-tts", voice="alloy", input="Hi")


async def test_speech_is_streamed_through_the_gateway_not_buffered(gw: ThreadGateway) -> None:
    with gw.client() as client:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Warm up.", response_format="pcm")
    started = time.perf_counter()
    headers, chunks = await post_chunked(gw.url, "/v1/audio/speech", {
        "model": "tts-1", "voice": "alloy", "input": " ".join([SENTENCE] * 8), "response_format": "pcm"})
    assert headers[":status"] == "200" and headers["x-synapse-backend"] == "audio"
    assert_streamed(started, chunks)
    assert headers["transfer-encoding"] == "chunked"
    assert 8 * 1.0 < sum(size for _, size in chunks) / 2 / 24000 < 8 * 6.0  # all of it, at 24 kHz


def test_the_usage_ledger_records_characters_spoken_and_seconds_heard(gw: ThreadGateway, spoken: bytes) -> None:
    with gw.client() as client:
        client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken, "audio/wav"))
    database = Path(os.environ["SYNAPSE_DATA_DIR"]) / "synapse.db"
    rows = rows_of(database, 2)
    speech, heard = rows[0], rows[1]
    assert speech["path"] == "/v1/audio/speech" and speech["characters"] == len(SENTENCE)
    with wave.open(io.BytesIO(spoken)) as wav:  # a streamed WAV's header cannot know its length: count bytes
        seconds = (len(spoken) - 44) / (wav.getframerate() * wav.getsampwidth() * wav.getnchannels())
    assert heard["path"] == "/v1/audio/transcriptions" and heard["audio_seconds"] == pytest.approx(seconds, abs=0.1)


def test_an_upload_with_two_model_fields_is_refused(start_gateway: GatewayFactory, audio_engine: str,
                                                    spoken: bytes) -> None:
    gw = start_gateway({"auth": {"master_key": "sk-m"}, "backends": {"audio": {"url": audio_engine}}})
    with gw.http() as http:
        made = http.post("/key/generate", json={"models": ["whisper-1"]},
                         headers={"Authorization": "Bearer sk-m"}).json()["key"]
        files = [("model", (None, "whisper-1")), ("file", ("fox.wav", spoken, "audio/wav")),
                 ("model", (None, "whisper-secret"))]
        answer = http.post("/v1/audio/transcriptions", files=files, headers={"Authorization": f"Bearer {made}"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "model"
