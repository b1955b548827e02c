"""Uploads are decoded under a cap on their length: a small compressed file must not become gigabytes."""

from __future__ import annotations

import io
import wave

import httpx
import numpy as np
import pytest

from synapse_gateway.errors import InvalidRequest
from tests.audio.conftest import packaged_config

SILENCE_RATE = 8000


def flac_of_silence(seconds: int) -> bytes:
    """`seconds` of 8 kHz silence as FLAC, written as a stream: the header does not say how long it is."""
    packaged_config()  # skips (or fails under SYNAPSE_REQUIRE_ENGINES=1) without PyAV
    from synapse_gateway.audio.encode import speech_encoder

    encoder = speech_encoder("flac", SILENCE_RATE, pcm_rate=SILENCE_RATE)
    second = np.zeros(SILENCE_RATE, dtype=np.int16)
    data = b"".join(encoder.encode(second) for _ in range(seconds)) + encoder.finish()
    return data


def wav_at_8_hz(minutes: int) -> bytes:
    """`minutes` at 8 samples a second: 30 KB for 31 minutes, which decode to 30 million samples at 16 kHz."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8)
        out.writeframes(b"\0\0" * 8 * 60 * minutes)
    return buffer.getvalue()


def test_compressed_silence_is_refused_once_it_decodes_past_the_cap() -> None:
    from synapse_gateway.audio.stt import SAMPLE_RATE, decode_upload

    data = flac_of_silence(120)
    assert len(data) < 100_000  # two minutes in a few KB: the shape of a decode bomb
    with pytest.raises(InvalidRequest) as refused:
        decode_upload(data, 60)
    error = refused.value
    assert (error.status, error.param, error.code) == (400, "file", "audio_too_long")
    assert "longer than 1 min" in error.message and "split it" in error.message
    assert abs(decode_upload(data, 180).size - 120 * SAMPLE_RATE) < SAMPLE_RATE // 10


def test_the_default_cap_is_thirty_minutes() -> None:
    from synapse_gateway.audio.stt import decode_upload

    config = packaged_config()
    assert config.max_audio_seconds == 30 * 60
    with pytest.raises(InvalidRequest) as refused:
        decode_upload(wav_at_8_hz(31))  # decoded up to the cap, then refused
    assert refused.value.code == "audio_too_long" and "30 min" in refused.value.message


def test_the_engine_answers_a_too_long_upload_with_an_openai_error(audio_url: str) -> None:
    with httpx.Client(base_url=audio_url, timeout=60) as http:
        answer = http.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                           files={"file": ("long.wav", wav_at_8_hz(61), "audio/wav")})  # refused by its header
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "message": "the uploaded audio is longer than 30 min, the most this server transcribes in one request; "
                   "split it into shorter files",
        "type": "invalid_request_error", "param": "file", "code": "audio_too_long"}
