"""Convert BERT-family sentence-transformers checkpoints to GGUF for llama.cpp's embedding server.

Mirrors what llama.cpp's ``convert_hf_to_gguf.py`` does for ``BertModel``: WordPiece vocabulary in
"phantom space" form, special-token ids, mean/CLS pooling from ``1_Pooling/config.json``, pooler and
position-id tensors dropped. Weights are read straight from safetensors with numpy (no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "CONVERTER_VERSION",
    "SUPPORTED_ARCHITECTURES",
    "cached_gguf",
    "convert_bert_to_gguf",
    "source_key",
    "special_token_ids",
]

CONVERTER_VERSION = 1
SUPPORTED_ARCHITECTURES = ("BertModel", "BertForMaskedLM")

Array = npt.NDArray[Any]

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = (
    ("pooling_mode_mean_tokens", gguf.PoolingType.MEAN),
    ("pooling_mode_cls_token", gguf.PoolingType.CLS),
    ("pooling_mode_lasttoken", gguf.PoolingType.LAST),
)
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
_SKIPPED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.predictions", "cls.seq_relationship")
_ALWAYS_F32 = ("position_embd.weight", "token_types.weight")
_DEFAULT_SPECIALS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
_SPECIAL_ID_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _read_json(path: Path) -> Any:
    """Parsed JSON content of ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    """Parsed JSON object of ``path``, or ``{}`` when the file is missing or not an object."""
    if not path.is_file():
        return {}
    data = _read_json(path)
    return data if isinstance(data, dict) else {}


# -- model description -----------------------------------------------------------------------------


def load_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a supported BERT checkpoint; ValueError for anything else."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    config = _read_json_or_empty(path)
    archs = config.get("architectures") or []
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in archs):
        raise ValueError(
            f"unsupported architecture {archs or config.get('model_type')!r} in {path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    checks = {"position_embedding_type": "absolute", "hidden_act": "gelu"}
    for key, wanted in checks.items():
        if config.get(key, wanted) != wanted:
            raise ValueError(f"unsupported {key}={config[key]!r} in {path}; llama.cpp's BERT needs {wanted!r}")
    return config


def pooling_type(model_dir: Path) -> gguf.PoolingType | None:
    """Pooling from the sentence-transformers ``Pooling`` module; None when there is no modules.json."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    unsupported = [m["type"] for m in modules if m["type"] not in (_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE)]
    if unsupported:
        raise ValueError(f"unsupported sentence-transformers modules {unsupported} in {modules_path}")
    pooling_dirs = [m["path"] for m in modules if m["type"] == _ST_POOLING]
    if not pooling_dirs:
        return None
    pooling = _read_json_or_empty(model_dir / pooling_dirs[0] / "config.json")
    for key, kind in _POOLING_MODES:
        if pooling.get(key):
            return kind
    raise ValueError(f"unsupported pooling {pooling} in {model_dir / pooling_dirs[0]}: only mean, CLS and last")


# -- vocabulary ------------------------------------------------------------------------------------


def _wordpiece_vocab(model_dir: Path) -> dict[str, int]:
    """Token -> id of the WordPiece vocabulary (tokenizer.json, else vocab.txt)."""
    tokenizer = _read_json_or_empty(model_dir / "tokenizer.json")
    model = tokenizer.get("model") or {}
    if model:
        if model.get("type") != "WordPiece":
            raise ValueError(f"unsupported tokenizer {model.get('type')!r} in {model_dir}: need WordPiece")
        return {str(tok): int(idx) for tok, idx in model["vocab"].items()}
    vocab_txt = model_dir / "vocab.txt"
    if not vocab_txt.is_file():
        raise ValueError(f"{model_dir} has neither tokenizer.json nor vocab.txt")
    lines = vocab_txt.read_text(encoding="utf-8").splitlines()
    return {tok: idx for idx, tok in enumerate(lines)}


def _special_names(model_dir: Path) -> dict[str, str]:
    """Special-token kind -> text, from tokenizer_config.json / special_tokens_map.json, BERT defaults."""
    names = dict(_DEFAULT_SPECIALS)
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        spec = _read_json_or_empty(model_dir / file)
        for kind in _SPECIAL_ID_KINDS:
            value = spec.get(f"{kind}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[kind] = value
    return names


def _token_kinds(model_dir: Path, vocab: dict[str, int]) -> dict[int, gguf.TokenType]:
    """Control/user-defined types of the added and special tokens, by id."""
    kinds: dict[int, gguf.TokenType] = {}
    for added in _read_json_or_empty(model_dir / "tokenizer.json").get("added_tokens", []):
        kinds[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for name in _special_names(model_dir).values():
        if name in vocab:
            kinds[vocab[name]] = gguf.TokenType.CONTROL
    return kinds


def special_token_ids(model_dir: Path) -> dict[str, int]:
    """Special-token ids (bos is [CLS]) found by name in the vocabulary; fills gaps left by SpecialVocab."""
    vocab = _wordpiece_vocab(model_dir)
    ids = {kind: vocab[name] for kind, name in _special_names(model_dir).items() if name in vocab}
    if "cls" in ids:
        ids.setdefault("bos", ids["cls"])
    return ids


def _phantom(token: str, kind: int) -> str:
    """llama.cpp's "phantom space" spelling of a WordPiece token."""
    if kind == gguf.TokenType.CONTROL:
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def read_vocab(model_dir: Path, vocab_size: int | None = None) -> tuple[list[str], list[int]]:
    """Phantom-space tokens and their GGUF token types, ``vocab_size`` long (padded as unused)."""
    vocab = _wordpiece_vocab(model_dir)
    size = vocab_size if vocab_size is not None else len(vocab)
    if max(vocab.values()) >= size:
        raise ValueError(f"tokenizer of {model_dir} has ids beyond vocab_size={size}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    kinds = _token_kinds(model_dir, vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
        types[idx] = int(kinds.get(idx, gguf.TokenType.NORMAL))
    return [_phantom(tok, kind) for tok, kind in zip(tokens, types, strict=True)], types


# -- weights ---------------------------------------------------------------------------------------


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (single file or sharded index)."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json_or_empty(index).get("weight_map", {}).values()))
        return [model_dir / shard for shard in shards]
    raise ValueError(f"{model_dir} has no model.safetensors (pytorch_model.bin is not supported)")


def _decode(raw: Array, dtype: str, shape: list[int]) -> Array:
    """A little-endian safetensors byte range as a float32/float16/int array of ``shape``."""
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {dtype}")
    array = raw.view(np.dtype(_ST_DTYPES[dtype])).reshape(shape)
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return array.astype(np.float32)
    return array


def iter_safetensors(path: Path) -> Iterator[tuple[str, Array]]:
    """(name, array) for each tensor of a safetensors file, memory-mapped."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        yield name, _decode(data[start:end], info["dtype"], list(info["shape"]))


def gguf_tensor_name(name: str, tensor_map: gguf.TensorNameMap) -> str | None:
    """The GGUF name of a Hugging Face BERT tensor; None for tensors llama.cpp does not use."""
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name.removesuffix(".gamma") + ".weight"
    elif name.endswith(".beta"):
        name = name.removesuffix(".beta") + ".bias"
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ValueError(f"cannot map tensor {name!r} to llama.cpp's BERT")
    return mapped


def _output_array(gguf_name: str, array: Array, f16: bool) -> Array:
    """Tensor in its GGUF dtype: f16 for 2-D weights when asked, f32 for the rest."""
    if f16 and array.ndim == 2 and not gguf_name.endswith(_ALWAYS_F32):
        return array.astype(np.float16)
    return array if array.dtype == np.float32 else array.astype(np.float32)


# -- writing ---------------------------------------------------------------------------------------


def _model_name(model_dir: Path) -> str:
    """A readable name: the folder, or its parent when the folder is a generic ``model``."""
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name


def _write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], pooling: gguf.PoolingType | None) -> None:
    """Model hyper-parameters, as convert_hf_to_gguf.py writes them for BERT."""
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 512)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    if pooling is not None:
        writer.add_pooling_type(pooling)


def _write_vocab(writer: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any]) -> None:
    """WordPiece vocabulary, token types and special-token ids."""
    tokens, types = read_vocab(model_dir, config.get("vocab_size"))
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    kinds = [kind for kind in _SPECIAL_ID_KINDS if hasattr(writer, f"add_{kind}_token_id")]  # no cls in new gguf
    special = gguf.SpecialVocab(model_dir, n_vocab=len(tokens), special_token_types=kinds)
    for kind, token_id in special_token_ids(model_dir).items():
        if kind in kinds:
            special.special_token_ids.setdefault(kind, token_id)
    special.add_to_gguf(writer, quiet=True)


def _add_tensors(writer: gguf.GGUFWriter, model_dir: Path, n_blocks: int, f16: bool) -> None:
    """Every used tensor of the checkpoint, renamed for llama.cpp."""
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_blocks)
    for path in _safetensors_files(model_dir):
        for name, array in iter_safetensors(path):
            gguf_name = gguf_tensor_name(name, tensor_map)
            if gguf_name is not None:
                writer.add_tensor(gguf_name, _output_array(gguf_name, array, f16))


def convert_bert_to_gguf(model_dir: Path, out_path: Path, *, f16: bool = True) -> Path:
    """Write ``model_dir`` (a BERT sentence-transformers folder) as a GGUF file at ``out_path``."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = load_config(model_dir)
    pooling = pooling_type(model_dir)
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    try:
        writer.add_name(_model_name(model_dir))
        file_type = gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(writer, config, pooling)
        _write_vocab(writer, model_dir, config)
        _add_tensors(writer, model_dir, int(config["num_hidden_layers"]), f16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out_path


# -- cache -----------------------------------------------------------------------------------------


def source_key(model_dir: Path, *, f16: bool = True) -> str:
    """Hash of the converter version, output type and every source file's path, size and mtime."""
    digest = hashlib.sha256(f"v{CONVERTER_VERSION} f16={f16}\n".encode())
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cached_gguf(model_dir: Path, cache_dir: Path, *, f16: bool = True) -> Path:
    """GGUF of ``model_dir`` in ``cache_dir``, converted once; safe against concurrent callers."""
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    target = cache_dir / f"{_model_name(model_dir)}-{source_key(model_dir, f16=f16)}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        convert_bert_to_gguf(model_dir, tmp, f16=f16)
        os.replace(tmp, target)  # atomic: readers see either nothing or a complete file
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target
