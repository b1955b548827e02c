"""Transcript renderings and the streaming WAV header, without any model."""

from __future__ import annotations

import io
import wave

import orjson
import pytest

from synapse_gateway.audio.formats import render_transcript, srt, timestamp, verbose_json, vtt, wav_stream_header
from synapse_gateway.audio.stt import Segment, Transcript, Word


def _segment(index: int, start: float, end: float, text: str, words: list[Word] | None = None) -> Segment:
    return Segment(id=index, seek=0, start=start, end=end, text=text, tokens=[1, 2], temperature=0.0,
                   avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01, words=words)


TRANSCRIPT = Transcript(task="transcribe", language="en", duration=3723.5, segments=[
    _segment(0, 0.0, 1.5, " Hello there."), _segment(1, 3661.0015, 3723.4996, " Goodbye.")])


@pytest.mark.parametrize(("seconds", "srt_time", "vtt_time"), [
    (0.0, "00:00:00,000", "00:00:00.000"), (1.5, "00:00:01,500", "00:00:01.500"),
    (3661.0015, "01:01:01,002", "01:01:01.002"), (59.9996, "00:01:00,000", "00:01:00.000"), (-0.1, "00:00:00,000",
                                                                                             "00:00:00.000")])
def test_timestamps(seconds: float, srt_time: str, vtt_time: str) -> None:
    assert (timestamp(seconds, ","), timestamp(seconds, ".")) == (srt_time, vtt_time)


def test_srt() -> None:
    assert srt(TRANSCRIPT) == ("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                               "2\n01:01:01,002 --> 01:02:03,500\nGoodbye.\n")


def test_vtt() -> None:
    assert vtt(TRANSCRIPT) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n"
                               "01:01:01.002 --> 01:02:03.500\nGoodbye.\n")


def test_json_and_text() -> None:
    assert render_transcript(TRANSCRIPT, "json") == (
        b'{"text":"Hello there. Goodbye.","usage":{"type":"duration","seconds":3723.5}}', "application/json")
    assert render_transcript(TRANSCRIPT, "text") == (b"Hello there. Goodbye.\n", "text/plain; charset=utf-8")


def test_verbose_json_segments_and_words() -> None:
    plain = orjson.loads(render_transcript(TRANSCRIPT, "verbose_json")[0])
    assert plain["task"] == "transcribe" and plain["language"] == "en" and plain["duration"] == 3723.5
    assert [s["id"] for s in plain["segments"]] == [0, 1] and "words" not in plain
    assert set(plain["segments"][0]) == {"id", "seek", "start", "end", "text", "tokens", "temperature",
                                         "avg_logprob", "compression_ratio", "no_speech_prob"}
    worded = Transcript("transcribe", "en", 1.0, [_segment(0, 0.0, 1.0, " Hi you.", [
        Word(" Hi", 0.0, 0.4, 0.9), Word(" you.", 0.4, 1.0, 0.8)])])
    assert verbose_json(worded)["words"] == [{"word": "Hi", "start": 0.0, "end": 0.4},
                                             {"word": "you.", "start": 0.4, "end": 1.0}]


def test_wav_stream_header_reads_with_the_wave_module() -> None:
    header = wav_stream_header(22050)
    assert len(header) == 44 and header[4:8] == header[40:44] == b"\xff\xff\xff\xff"
    with wave.open(io.BytesIO(header + b"\x01\x00" * 100)) as clip:
        assert (clip.getnchannels(), clip.getsampwidth(), clip.getframerate()) == (1, 2, 22050)
        assert clip.readframes(clip.getnframes()) == b"\x01\x00" * 100
