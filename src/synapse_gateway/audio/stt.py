"""Speech to text with faster-whisper: load a model, decode an upload, transcribe or translate it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ..errors import InvalidRequest
from .config import MAX_AUDIO_SECONDS, WhisperModelConfig

if TYPE_CHECKING:
    import av

Task = Literal["transcribe", "translate"]
Audio = npt.NDArray[np.float32]
SAMPLE_RATE = 16000


@dataclass(frozen=True, slots=True)
class Word:
    """One word with its timing."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True, slots=True)
class Segment:
    """One decoded stretch of speech, with Whisper's own quality measures."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None


@dataclass(frozen=True, slots=True)
class Transcript:
    """What Whisper heard in one file."""

    task: Task
    language: str
    duration: float
    segments: list[Segment]

    @property
    def text(self) -> str:
        """All segments' text, joined and trimmed."""
        return "".join(segment.text for segment in self.segments).strip()


@dataclass(frozen=True, slots=True)
class TranscriptionOptions:
    """The request's knobs, already validated for type."""

    task: Task = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    word_timestamps: bool = False


def load_whisper(config: WhisperModelConfig) -> Whisper:
    """Load a CTranslate2 Whisper model from its folder; never download anything."""
    import ctranslate2  # type: ignore[import-untyped]
    from faster_whisper import WhisperModel  # type: ignore[import-untyped]

    if not (config.path / "tokenizer.json").is_file():
        # faster-whisper would fetch a tokenizer from the Hugging Face hub: refuse instead
        raise FileNotFoundError(f"{config.path} has no tokenizer.json; copy it from the model's repository")
    device = config.device
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    compute_type = config.compute_type or ("float16" if device == "cuda" else "int8")
    model = WhisperModel(str(config.path), device=device, compute_type=compute_type,
                         cpu_threads=config.cpu_threads, local_files_only=True)
    return Whisper(model, beam_size=config.beam_size, device=device, compute_type=compute_type)


def decode_upload(data: bytes, max_seconds: float = MAX_AUDIO_SECONDS) -> Audio:
    """The upload as 16 kHz mono float samples, decoded by PyAV; 400 when it is not audio or is too long.

    Decoding stops as soon as the audio passes `max_seconds`: a few MB of compressed silence (or a WAV
    header claiming 8 Hz) would otherwise decode to gigabytes of samples.
    """
    import av

    if not data:
        raise InvalidRequest("the uploaded file is empty", param="file", code="empty_file")
    try:
        pcm = _decode_s16(io.BytesIO(data), limit=int(max_seconds * SAMPLE_RATE))
    except _TooLong:
        raise InvalidRequest(f"the uploaded audio is longer than {_duration(max_seconds)}, the most this server "
                             "transcribes in one request; split it into shorter files",
                             param="file", code="audio_too_long") from None
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise InvalidRequest("the uploaded file could not be decoded as audio; send a file in a format "
                             "such as flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, wav or webm",
                             param="file", code="invalid_file_format") from exc
    if pcm.size == 0:
        raise InvalidRequest("the uploaded file contains no audio samples", param="file", code="empty_audio")
    samples: Audio = pcm.astype(np.float32) / np.float32(32768.0)
    return samples


class _TooLong(Exception):
    """The decoded audio passed the limit."""


def _decode_s16(source: io.BytesIO, *, limit: int) -> npt.NDArray[np.int16]:
    """Decode and resample to 16 kHz mono 16-bit, a frame at a time, keeping at most `limit` samples."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    pieces: list[npt.NDArray[np.int16]] = []
    total = 0
    with av.open(source, mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        claimed = (container.duration or 0) / 1_000_000 * SAMPLE_RATE
        if claimed > 2 * limit:  # far too long by its header (an estimate for some formats): do not decode
            raise _TooLong
        for frame in _valid_frames(container.decode(audio=0)):
            for out in resampler.resample(frame):
                total += out.samples
                if total > limit:
                    raise _TooLong
                pieces.append(_samples(out))
        pieces.extend(_samples(out) for out in resampler.resample(None))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)


def _samples(frame: av.AudioFrame) -> npt.NDArray[np.int16]:
    return frame.to_ndarray().reshape(-1).astype(np.int16, copy=False)


def _valid_frames(frames: Iterator[Any]) -> Iterator[Any]:
    """Skip frames FFmpeg cannot decode (a damaged packet) rather than failing the whole file."""
    import av

    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes and rest else f"{minutes} min" if minutes else f"{rest} s"


class Whisper:
    """A loaded faster-whisper model and the settings it runs with."""

    def __init__(self, model: Any, *, beam_size: int, device: str, compute_type: str) -> None:
        self.model = model
        self.beam_size = beam_size
        self.device = device
        self.compute_type = compute_type

    @property
    def multilingual(self) -> bool:
        """False for English-only models (*.en), which can neither translate nor take other languages."""
        return bool(self.model.model.is_multilingual)

    def check(self, options: TranscriptionOptions, model_name: str) -> None:
        """400 for what this model cannot do: translating with an English-only model, unknown languages."""
        if options.task == "translate" and not self.multilingual:
            raise InvalidRequest(f"the model `{model_name}` is English-only and cannot translate; configure a "
                                 "multilingual Whisper model (e.g. large-v3) for /v1/audio/translations",
                                 param="model", code="translation_unsupported")
        languages: list[str] = list(self.model.supported_languages)
        if options.language is not None and options.language not in languages:
            shown = ", ".join(languages[:12]) + (", ..." if len(languages) > 12 else "")
            raise InvalidRequest(f"the model `{model_name}` does not know the language {options.language!r}; "
                                 f"use an ISO-639-1 code it supports ({shown})",
                                 param="language", code="unsupported_language")

    def transcribe(self, audio: Audio, options: TranscriptionOptions) -> Transcript:
        """Run Whisper over the whole clip (blocking: call it from a worker thread)."""
        temperature: Any = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if not options.temperature else options.temperature
        segments, info = self.model.transcribe(
            audio, language=options.language, task=options.task, beam_size=self.beam_size,
            initial_prompt=options.prompt or None, temperature=temperature,
            word_timestamps=options.word_timestamps)
        found = [_segment(index, segment) for index, segment in enumerate(segments)]
        return Transcript(task=options.task, language=str(info.language), duration=float(info.duration),
                          segments=found)


def _segment(index: int, raw: Any) -> Segment:
    words = None if raw.words is None else [
        Word(word=w.word, start=float(w.start), end=float(w.end), probability=float(w.probability))
        for w in raw.words]
    return Segment(id=index, seek=int(raw.seek), start=float(raw.start), end=float(raw.end), text=raw.text,
                   tokens=list(raw.tokens), temperature=float(raw.temperature or 0.0),
                   avg_logprob=float(raw.avg_logprob), compression_ratio=float(raw.compression_ratio),
                   no_speech_prob=float(raw.no_speech_prob), words=words)
