"""POST /v1/audio/transcriptions: every response_format, through the official OpenAI client."""

from __future__ import annotations

import re

import openai
import pytest

from tests.audio.speech import FOX, word_errors

TWO_SENTENCES = FOX + " Please call me back tomorrow morning."
_SRT_TIME = r"\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d"
_VTT_TIME = r"\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d"


@pytest.fixture(scope="module")
def clip(audio_url: str) -> bytes:
    """Two spoken sentences as WAV."""
    with openai.OpenAI(base_url=f"{audio_url}/v1", api_key="unused", max_retries=0) as api:
        return api.audio.speech.create(model="tts-1", voice="alloy", input=TWO_SENTENCES,
                                       response_format="wav").content


def test_json(client: openai.OpenAI, clip: bytes) -> None:
    result = client.audio.transcriptions.create(model="whisper-tiny.en", file=("clip.wav", clip))
    assert word_errors(TWO_SENTENCES, result.text) <= 1, result.text


def test_text(client: openai.OpenAI, clip: bytes) -> None:
    text = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), response_format="text")
    assert isinstance(text, str) and text.endswith("\n")
    assert word_errors(TWO_SENTENCES, text) <= 1, text


def test_srt(client: openai.OpenAI, clip: bytes) -> None:
    srt = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), response_format="srt")
    cues = [cue.split("\n") for cue in srt.strip().split("\n\n")]
    assert [cue[0] for cue in cues] == [str(n) for n in range(1, len(cues) + 1)]
    assert all(re.fullmatch(_SRT_TIME, cue[1]) for cue in cues), srt
    assert word_errors(TWO_SENTENCES, " ".join(" ".join(cue[2:]) for cue in cues)) <= 1


def test_vtt(client: openai.OpenAI, clip: bytes) -> None:
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), response_format="vtt")
    header, *cues = vtt.strip().split("\n\n")
    assert header == "WEBVTT"
    assert all(re.fullmatch(_VTT_TIME, cue.split("\n")[0]) for cue in cues), vtt
    assert word_errors(TWO_SENTENCES, " ".join(cue.split("\n", 1)[1] for cue in cues)) <= 1


def test_verbose_json(client: openai.OpenAI, clip: bytes) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip),
                                                response_format="verbose_json", timestamp_granularities=["word"])
    assert result.language == "en"
    assert 3.0 < result.duration < 8.0
    segments = result.segments or []
    assert [s.id for s in segments] == list(range(len(segments)))
    assert all(0 <= s.start < s.end <= result.duration + 0.5 for s in segments)
    assert word_errors(TWO_SENTENCES, "".join(s.text for s in segments)) <= 1
    spoken = result.words or []
    assert word_errors(TWO_SENTENCES, " ".join(w.word for w in spoken)) <= 1
    assert all(w.start <= w.end for w in spoken)


def test_prompt_and_temperature_are_accepted(client: openai.OpenAI, clip: bytes) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), language="en",
                                                prompt="A fox story.", temperature=0.2)
    assert word_errors(TWO_SENTENCES, result.text) <= 1, result.text
