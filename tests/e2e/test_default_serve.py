"""`synapse serve` with no config brings up the whole local stack from packages, as `make serve` does."""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from synapse_gateway.localstack import packaged
from tests.engines.fixtures import require_engine
from tests.fakes.ollama import FakeOllama
from tests.gateway_harness import ProcessGateway

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(["llama3.2:3b"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, ollama: FakeOllama) -> Iterator[ProcessGateway]:
    needed = {"SmolLM2": packaged.smollm2_gguf(), "MiniLM": packaged.minilm_dir(),
              "Whisper": packaged.whisper_tiny_en_dir(), "Piper voice": packaged.piper_joe_voice()}
    missing = [name for name, path in needed.items() if path is None]
    if missing:
        require_engine(f"the local stack's models are not installed ({', '.join(missing)}): run `make serve` once")
    folder = tmp_path_factory.mktemp("stack")
    gateway = ProcessGateway(None, folder / "synapse.log",
                             {"OLLAMA_HOST": ollama.url, "SYNAPSE_CACHE_DIR": str(folder / "cache")})
    gateway.start(ready_timeout=60)
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            deadline = time.monotonic() + 120
            while any(e["state"] != "ready" for e in http.get("/admin/engines").json()["engines"]):
                assert time.monotonic() < deadline, gateway.log()[-3000:]
                time.sleep(0.2)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture
def client(stack: ProcessGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120) as api:
        yield api


def test_all_engines_are_managed_and_listed(stack: ProcessGateway, client: openai.OpenAI) -> None:
    with httpx.Client(base_url=stack.url) as http:
        engines = {e["name"]: e for e in http.get("/admin/engines").json()["engines"]}
    assert set(engines) == {"chat", "embeddings", "audio"}
    assert all(e["pid"] and e["rss_bytes"] for e in engines.values())
    ids = {m.id for m in client.models.list()}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-1", "tts-1", "llama3.2:3b"} <= ids


def test_chat_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48, temperature=0)
    assert completion.model == "smollm2-135m-instruct"
    assert "paris" in (completion.choices[0].message.content or "").lower()
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
        stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2


def test_embeddings_rank_close_sentences_higher(client: openai.OpenAI) -> None:
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    vectors = np.array([d.embedding for d in client.embeddings.create(model="all-minilm-l6-v2",
                                                                       input=sentences).data])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_speech_round_trip(client: openai.OpenAI) -> None:
    sentence = "The weather is sunny and warm today in the city."
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input=sentence, response_format="wav")
    text = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", audio.read(), "audio/wav"))
    heard = re.findall(r"[a-z]+", text.text.lower())
    expected = re.findall(r"[a-z]+", sentence.lower())
    edits = [op for op in difflib.SequenceMatcher(a=expected, b=heard).get_opcodes() if op[0] != "equal"]
    assert len(edits) <= 1, (heard, expected)


def test_unknown_models_go_to_ollama(client: openai.OpenAI, ollama: FakeOllama) -> None:
    completion = client.chat.completions.create(model="llama3.2:3b", messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content == "fake reply from llama3.2:3b"


def test_engines_command_lists_them(stack: ProcessGateway, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from synapse_gateway.cli import main

    result = CliRunner().invoke(main, ["engines", "--url", stack.url])
    assert result.exit_code == 0
    for name in ("chat", "embeddings", "audio"):
        assert re.search(rf"^{name}\s+ready\s+\d+", result.output, re.MULTILINE), result.output
