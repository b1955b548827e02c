"""Text to speech with Piper: load a voice, synthesize sentence by sentence, encode as it goes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import PiperVoiceConfig
from .encode import SpeechEncoder

if TYPE_CHECKING:
    from piper import AudioChunk, PiperVoice


@dataclass(frozen=True, slots=True)
class Voice:
    """A loaded Piper voice and the speaker it speaks with."""

    piper: PiperVoice
    speaker_id: int | None

    @property
    def sample_rate(self) -> int:
        """The voice's output rate in Hz."""
        return int(self.piper.config.sample_rate)


def load_piper(config: PiperVoiceConfig) -> Voice:
    """Load a Piper voice (ONNX model and JSON config) from disk."""
    from piper import PiperVoice

    piper = PiperVoice.load(config.path, config_path=config.json_path, use_cuda=config.device == "cuda")
    return Voice(piper, _speaker_id(config, piper))


def _speaker_id(config: PiperVoiceConfig, piper: PiperVoice) -> int | None:
    speaker = config.speaker
    if speaker is None or isinstance(speaker, int):
        return speaker
    known = dict(piper.config.speaker_id_map)
    if speaker not in known:
        raise ValueError(f"voice {config.path} has no speaker {speaker!r}; it has {sorted(known)[:20]}")
    return int(known[speaker])


class SpeechJob:
    """One input spoken sentence by sentence; each `step()` runs in a worker thread, one at a time."""

    def __init__(self, voice: Voice, text: str, *, speed: float, encoder: SpeechEncoder) -> None:
        from piper import SynthesisConfig

        length_scale = voice.piper.config.length_scale / speed
        settings = SynthesisConfig(speaker_id=voice.speaker_id, length_scale=length_scale)
        self._chunks: Iterator[AudioChunk] = iter(voice.piper.synthesize(text, settings))
        self._encoder = encoder
        self.sentences = 0
        self.samples = 0

    def step(self) -> tuple[bytes, bool]:
        """The encoded audio of the next sentence, and whether that was the last (then with the trailer)."""
        chunk = next(self._chunks, None)
        if chunk is None:
            return self._encoder.finish(), True
        self.sentences += 1
        self.samples += len(chunk.audio_float_array)
        return self._encoder.encode(chunk.audio_int16_array), False

    def close(self) -> None:
        """Stop synthesizing (call only when no step is running)."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
