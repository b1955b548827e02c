"""AudioEngineConfig: packaged defaults, YAML with located problems, name checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from synapse_gateway.audio import AudioEngineConfig, WhisperModelConfig
from synapse_gateway.config.problems import ConfigError
from synapse_gateway.localstack.packaged import piper_joe_voice, whisper_tiny_en_dir
from tests.audio.conftest import packaged_config


def test_packaged_default_names_and_aliases() -> None:
    config = packaged_config()
    assert config.stt_models["whisper-tiny.en"].path == whisper_tiny_en_dir()
    assert config.stt_models["whisper-tiny.en"].aliases == ["whisper-1"]
    assert config.tts_voices["joe"].path == piper_joe_voice()
    assert config.tts_voices["joe"].json_path.name == "en_US-joe-medium.onnx.json"
    assert config.tts_voices["joe"].aliases == ["alloy"]
    assert "tts-1" in config.tts_models and config.idle_unload == 300 and config.max_upload_bytes == 25 * 2**20


def test_yaml_with_packaged_paths(tmp_path: Path) -> None:
    packaged_config()
    path = tmp_path / "audio.yaml"
    path.write_text("stt_models:\n  tiny:\n    path: packaged\n    device: cpu\n    beam_size: 1\n"
                    "tts_voices:\n  joe:\n    path: packaged\n    aliases: [alloy, echo]\nidle_unload: 60\n")
    config = AudioEngineConfig.from_yaml(path)
    assert config.stt_models["tiny"].beam_size == 1 and config.tts_voices["joe"].aliases == ["alloy", "echo"]


def test_yaml_problems_name_file_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "audio.yaml"
    path.write_text(f"stt_models:\n  big:\n    path: {tmp_path}\n    beam_size: 2\nidle_unlod: 5\n")
    with pytest.raises(ConfigError) as caught:
        AudioEngineConfig.from_yaml(path)
    rendered = str(caught.value)
    assert f"{path}:3: error: stt_models.big.path: {tmp_path} is not a CTranslate2 Whisper model folder" in rendered
    assert "fix: point `path` at a converted model folder" in rendered
    assert f"{path}:5: error: idle_unlod: unknown key `idle_unlod`" in rendered


def test_names_must_be_unique() -> None:
    folder = packaged_config().stt_models["whisper-tiny.en"].path
    with pytest.raises(ValidationError, match="the name 'a' is used twice"):
        AudioEngineConfig(stt_models={"a": WhisperModelConfig(path=folder),
                                      "b": WhisperModelConfig(path=folder, aliases=["a"])})


def test_voice_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no Piper voice at"):
        AudioEngineConfig.model_validate({"tts_voices": {"v": {"path": str(tmp_path / "v.onnx")}}})


def test_an_empty_config_says_what_to_add(tmp_path: Path) -> None:
    path = tmp_path / "audio.yaml"
    path.write_text("idle_unload: 5\n")
    with pytest.raises(ConfigError, match="no model is configured") as caught:
        AudioEngineConfig.from_yaml(path)
    assert "fix: add `stt_models: {whisper-1: {path: packaged}}`" in str(caught.value)
