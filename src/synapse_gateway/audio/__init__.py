"""Synapse's audio engine: the OpenAI audio API (speech to text, text to speech) over faster-whisper and Piper."""

from .app import create_audio_app
from .config import AudioEngineConfig, PiperVoiceConfig, WhisperModelConfig
from .server import run_audio_engine, serve_audio

__all__ = [
    "AudioEngineConfig",
    "PiperVoiceConfig",
    "WhisperModelConfig",
    "create_audio_app",
    "run_audio_engine",
    "serve_audio",
]
