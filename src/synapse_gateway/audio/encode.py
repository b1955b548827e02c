"""Speech encoders: 16-bit mono samples in, bytes of the requested format out, a piece at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from .formats import wav_stream_header

if TYPE_CHECKING:
    import av

Samples = npt.NDArray[np.int16]


@dataclass(frozen=True, slots=True)
class SpeechFormat:
    """How one `response_format` is produced: its MIME type and, for compressed ones, PyAV muxer and codec."""

    content_type: str
    muxer: str | None = None
    codec: str | None = None
    rate: int | None = None  # a fixed output rate; None: the voice's (or the nearest the codec takes)
    options: tuple[tuple[str, str], ...] = ()


SPEECH_FORMATS: dict[str, SpeechFormat] = {
    "mp3": SpeechFormat("audio/mpeg", "mp3", "libmp3lame"),
    # Ogg pages of at most 100 ms, so Opus streams instead of arriving in 1 s pages
    "opus": SpeechFormat("audio/ogg", "ogg", "libopus", rate=48000, options=(("page_duration", "100000"),)),
    "aac": SpeechFormat("audio/aac", "adts", "aac"),
    "flac": SpeechFormat("audio/flac", "flac", "flac"),
    "wav": SpeechFormat("audio/wav"),
    "pcm": SpeechFormat("audio/pcm"),
}


class SpeechEncoder(Protocol):
    """Turns samples into the bytes of one format; `finish` returns whatever the format ends with."""

    def encode(self, samples: Samples) -> bytes:
        """The bytes for the next `samples` (possibly none yet: codecs buffer)."""
        ...

    def finish(self) -> bytes:
        """The remaining bytes: flushed codec frames and the container's trailer."""
        ...

    def close(self) -> None:
        """Release the encoder without finishing (the client went away)."""
        ...


def speech_encoder(response_format: str, sample_rate: int, *, pcm_rate: int) -> SpeechEncoder:
    """The encoder for `response_format` (a key of SPEECH_FORMATS) of a voice speaking at `sample_rate`."""
    spec = SPEECH_FORMATS[response_format]
    if response_format == "wav":
        return WavEncoder(sample_rate)
    if response_format == "pcm":
        return PcmEncoder(sample_rate, pcm_rate)
    return AvEncoder(spec, sample_rate)


class WavEncoder:
    """A WAV header with unknown (0xFFFFFFFF) sizes, then raw samples: playable while it streams."""

    def __init__(self, sample_rate: int) -> None:
        self._header: bytes | None = wav_stream_header(sample_rate)

    def encode(self, samples: Samples) -> bytes:
        """The header (first time only) and the samples."""
        return self._take_header() + samples.astype("<i2", copy=False).tobytes()

    def finish(self) -> bytes:
        """The header, if no samples came at all."""
        return self._take_header()

    def close(self) -> None:
        """Nothing to release."""

    def _take_header(self) -> bytes:
        header, self._header = self._header or b"", None
        return header


class PcmEncoder:
    """Raw signed 16-bit little-endian mono samples at `rate` (resampled by PyAV when the voice differs)."""

    def __init__(self, sample_rate: int, rate: int) -> None:
        import av

        self._sample_rate = sample_rate
        self._resampler = None if rate == sample_rate else av.AudioResampler(format="s16", layout="mono", rate=rate)

    def encode(self, samples: Samples) -> bytes:
        """The samples, resampled when needed."""
        if self._resampler is None:
            return samples.astype("<i2", copy=False).tobytes()
        return _frames_bytes(self._resampler.resample(_frame(samples, self._sample_rate)))

    def finish(self) -> bytes:
        """What the resampler still holds."""
        return b"" if self._resampler is None else _frames_bytes(self._resampler.resample(None))

    def close(self) -> None:
        """Nothing to release."""


class _Sink:
    """A write-only file for PyAV: without `seek` the muxer streams and never rewrites a header."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        """Keep `data` until `take`."""
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        """Everything written since the last `take`."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class AvEncoder:
    """A compressed format (mp3, opus in Ogg, aac in ADTS, flac) encoded and muxed by PyAV's FFmpeg."""

    def __init__(self, spec: SpeechFormat, sample_rate: int) -> None:
        import av

        assert spec.muxer is not None and spec.codec is not None
        self._sink = _Sink()
        self._sample_rate = sample_rate
        self._container = av.open(self._sink, mode="w", format=spec.muxer, container_options=dict(spec.options))
        rate = spec.rate or _supported_rate(av.Codec(spec.codec, "w"), sample_rate)
        stream = self._container.add_stream(spec.codec, rate=rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        self._stream = stream
        self._closed = False

    def encode(self, samples: Samples) -> bytes:
        """Whatever packets the codec completed with these samples, muxed."""
        for packet in self._stream.encode(_frame(samples, self._sample_rate)):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        """The codec's last packets and the container's trailer."""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self.close()
        return self._sink.take()

    def close(self) -> None:
        """Write the trailer and release FFmpeg's muxer; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._container.close()


def _supported_rate(codec: av.Codec, rate: int) -> int:
    rates = codec.audio_rates
    if not rates or rate in rates:
        return rate
    higher = [r for r in rates if r >= rate]
    return min(higher) if higher else max(rates)


def _frame(samples: Samples, sample_rate: int) -> av.AudioFrame:
    import av

    frame = av.AudioFrame.from_ndarray(samples.astype(np.int16, copy=False).reshape(1, -1), format="s16",
                                       layout="mono")
    frame.sample_rate = sample_rate
    return frame


def _frames_bytes(frames: list[av.AudioFrame]) -> bytes:
    return b"".join(frame.to_ndarray().astype("<i2", copy=False).tobytes() for frame in frames)
