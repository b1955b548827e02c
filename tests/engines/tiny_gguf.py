"""Generate a tiny, random-weight llama GGUF model that llama.cpp can serve.

Nothing is downloaded: the model is written from scratch with the ``gguf`` package.
It is a 2-layer llama (n_embd 64, 4 heads, n_ff 128) with a byte-level BPE ("gpt2")
vocabulary of 256 byte tokens, a handful of merges and three ChatML special tokens,
plus a ChatML chat template, so ``/v1/completions`` and ``/v1/chat/completions`` work.

Properties tests can rely on:

* The file is a pure function of ``seed`` (same seed -> byte-identical file).
* The model never samples a special token (no EOS), a control byte or a byte >= 0x80:
  every generated token is printable ASCII (0x20-0x7E), ``\\n`` or one of the merges.
  Hence a request with ``max_tokens=N`` always produces exactly N tokens and ends with
  ``finish_reason == "length"``, and streamed text is never held back by llama.cpp
  waiting for the rest of a UTF-8 sequence.  This is done with a "bias" dimension:
  embedding dimension 0 is a constant that no layer writes to, and the output-matrix
  entry on that dimension is a large negative number for every forbidden token.
* With ``temperature=0`` the output for a given prompt is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_LAYER = 2
CONTEXT_LENGTH = 2048
RMS_EPS = 1e-5

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # also the EOS token

#: A minimal ChatML template (the string llama.cpp's template detection recognises as "chatml").
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A few merges; llama.cpp insists on a non-empty tokenizer.ggml.merges array for "gpt2".
_MERGES = ("Ġ t", "h e", "t h", "i n", "e r", "a n", "Ġ a", "o n")

_BIAS_DIM = 0  # residual-stream dimension holding the constant used to forbid tokens
_BIAS_VALUE = 8.0  # constant value of that dimension in every token embedding
_FORBID_WEIGHT = -10.0  # output weight on the bias dimension for forbidden tokens


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codepoints = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codepoints, strict=True)}


def build_vocab() -> tuple[list[str], list[int], list[bool]]:
    """Return (tokens, token types, allowed-to-generate flags). Token id == byte value for ids < 256."""
    byte_map = _bytes_to_unicode()
    tokens: list[str] = []
    types: list[int] = []
    allowed: list[bool] = []
    for b in range(256):
        tokens.append(byte_map[b])
        # Bytes >= 0x80 are not valid UTF-8 on their own: UNUSED, so they never decode to a
        # partial character that makes llama.cpp's streaming hold text back.
        types.append(int(gguf.TokenType.NORMAL if b < 0x80 else gguf.TokenType.UNUSED))
        allowed.append(0x20 <= b <= 0x7E or b == 0x0A)
    for merge in _MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(int(gguf.TokenType.NORMAL))
        allowed.append(True)
    for special in (BOS_TOKEN, IM_START, IM_END):
        tokens.append(special)
        types.append(int(gguf.TokenType.CONTROL))
        allowed.append(False)
    return tokens, types, allowed


def _tensors(rng: np.random.Generator, allowed: list[bool]) -> dict[str, np.ndarray]:
    n_vocab = len(allowed)
    head_dim = N_EMBD // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    # numpy shapes are the reverse of ggml's ne[]: (out_features, in_features).
    token_embd = normal((n_vocab, N_EMBD), 1.0)
    token_embd[:, _BIAS_DIM] = _BIAS_VALUE
    output = normal((n_vocab, N_EMBD), 0.5)
    output[:, _BIAS_DIM] = np.where(np.asarray(allowed), 0.0, _FORBID_WEIGHT)

    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": token_embd,
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
        "output.weight": output,
    }
    for i in range(N_LAYER):
        attn_output = normal((N_EMBD, N_EMBD), 0.05)
        ffn_down = normal((N_EMBD, N_FF), 0.05)
        # No layer writes to the bias dimension, so it stays constant in the residual stream.
        attn_output[_BIAS_DIM, :] = 0.0
        ffn_down[_BIAS_DIM, :] = 0.0
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.attn_q.weight": normal((N_EMBD, N_EMBD), 0.2),
            f"blk.{i}.attn_k.weight": normal((n_embd_kv, N_EMBD), 0.2),
            f"blk.{i}.attn_v.weight": normal((n_embd_kv, N_EMBD), 0.2),
            f"blk.{i}.attn_output.weight": attn_output,
            f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": normal((N_FF, N_EMBD), 0.2),
            f"blk.{i}.ffn_up.weight": normal((N_FF, N_EMBD), 0.2),
            f"blk.{i}.ffn_down.weight": ffn_down,
        }
    return tensors


def write_tiny_llama(path: Path, *, seed: int = 0, name: str = "synapse-tiny-llama") -> Path:
    """Write the tiny random llama model to ``path`` (parent folders are created) and return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, types, allowed = build_vocab()
    tensors = _tensors(np.random.default_rng(seed), allowed)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    try:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_vocab_size(len(tokens))
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(N_EMBD)
        writer.add_feed_forward_length(N_FF)
        writer.add_block_count(N_LAYER)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(RMS_EPS)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(list(_MERGES))
        writer.add_bos_token_id(tokens.index(BOS_TOKEN))
        writer.add_eos_token_id(tokens.index(IM_END))
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        for tensor_name, data in tensors.items():
            writer.add_tensor(tensor_name, data)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
