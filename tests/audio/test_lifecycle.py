"""Models load lazily (once, even under concurrent requests), unload after idling; SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from synapse_gateway.audio import create_audio_app
from tests.audio.conftest import packaged_config
from tests.audio.speech import FOX
from tests.fakes.server import BackgroundServer
from tests.gateway_harness import free_port


@pytest.fixture
def short_idle_url() -> Iterator[str]:
    """A fresh engine whose models unload after 0.5 s idle."""
    with BackgroundServer(create_audio_app(packaged_config(idle_unload=0.5))) as server:
        yield server.url


def _health(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/health", timeout=10)
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def _wait_for(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


async def test_lazy_load_once_then_idle_unload(short_idle_url: str) -> None:
    health = _health(short_idle_url)
    assert health["stt"]["whisper-tiny.en"]["loaded"] is False
    assert health["tts"]["joe"] == {"loaded": False, "in_use": 0, "idle_s": health["tts"]["joe"]["idle_s"],
                                    "loads": 0, "load_s": None}
    async with openai.AsyncOpenAI(base_url=f"{short_idle_url}/v1", api_key="unused", max_retries=0) as api:
        clips = await asyncio.gather(*(api.audio.speech.create(model="tts-1", voice="alloy", input=FOX,
                                                               response_format="wav") for _ in range(4)))
        assert all(len(clip.content) > 1000 for clip in clips)
        loaded = _health(short_idle_url)
        assert loaded["tts"]["joe"]["loads"] == 1  # four requests, one load
        assert loaded["stt"]["whisper-tiny.en"]["loaded"] is False  # nobody asked for it
        _wait_for(lambda: not _health(short_idle_url)["tts"]["joe"]["loaded"], timeout=10)
        again = await api.audio.speech.create(model="tts-1", voice="joe", input=FOX, response_format="pcm")
        assert len(again.content) > 1000
    assert _health(short_idle_url)["tts"]["joe"]["loads"] == 2


def test_models_lists_names_and_aliases(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"whisper-tiny.en", "whisper-1", "tts-1", "tts-1-hd", "piper"} <= ids


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    packaged_config()  # skip early when the models are missing
    port = free_port()
    code = ("from synapse_gateway.audio import AudioEngineConfig, run_audio_engine; "
            f"run_audio_engine(AudioEngineConfig.packaged_default(), '127.0.0.1', {port})")
    log = (tmp_path / "audio.log").open("wb")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONWARNINGS": "error"})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _reachable(url), timeout=30)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as api:
            audio = api.audio.speech.create(model="tts-1", voice="alloy", input=FOX, response_format="wav").content
            assert api.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio)).text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, (tmp_path / "audio.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _reachable(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
