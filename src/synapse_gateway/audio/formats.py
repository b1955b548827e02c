"""Wire formats: transcripts as json, text, srt, vtt and verbose_json; the streaming WAV header."""

from __future__ import annotations

import struct
from dataclasses import asdict
from typing import Any

import orjson

from .stt import Segment, Transcript

TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_UNKNOWN_SIZE = 0xFFFFFFFF


def render_transcript(transcript: Transcript, response_format: str) -> tuple[bytes, str]:
    """The body and content type of `transcript` in `response_format` (one of TRANSCRIPT_FORMATS)."""
    if response_format == "text":
        return (transcript.text + "\n").encode(), "text/plain; charset=utf-8"
    if response_format == "srt":
        return srt(transcript).encode(), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return vtt(transcript).encode(), "text/vtt; charset=utf-8"
    body: dict[str, Any] = verbose_json(transcript) if response_format == "verbose_json" else {"text": transcript.text}
    # As OpenAI's whisper-1 answers: the seconds of audio heard, which the gateway's usage ledger records.
    body["usage"] = {"type": "duration", "seconds": round(transcript.duration, 3)}
    return orjson.dumps(body), "application/json"


def verbose_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's verbose_json: task, language, duration, text, segments and, when asked for, words."""
    body: dict[str, Any] = {"task": transcript.task, "language": transcript.language,
                            "duration": round(transcript.duration, 3), "text": transcript.text,
                            "segments": [_segment_json(s) for s in transcript.segments]}
    if any(s.words is not None for s in transcript.segments):
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
                         for s in transcript.segments for w in s.words or []]
    return body


def _segment_json(segment: Segment) -> dict[str, Any]:
    fields = asdict(segment)
    del fields["words"]  # OpenAI lists words once, at the top level
    fields["start"], fields["end"] = round(segment.start, 3), round(segment.end, 3)
    return fields


def srt(transcript: Transcript) -> str:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    cues = [f"{number}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
            for number, s in enumerate(transcript.segments, start=1)]
    return "\n".join(cues)


def vtt(transcript: Transcript) -> str:
    """WebVTT: the `WEBVTT` line, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    cues = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n"
            for s in transcript.segments]
    return "\n".join(["WEBVTT\n", *cues])


def timestamp(seconds: float, decimal_marker: str) -> str:
    """`seconds` as HH:MM:SS followed by `decimal_marker` and milliseconds."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal_marker}{millis:03d}"


def wav_stream_header(sample_rate: int, *, channels: int = 1, sample_width: int = 2) -> bytes:
    """A RIFF/WAVE header for PCM whose length is not known yet: both sizes are 0xFFFFFFFF."""
    byte_rate = sample_rate * channels * sample_width
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, byte_rate, channels * sample_width, sample_width * 8)
    return (b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", _UNKNOWN_SIZE))
