"""A stand-in engine for managed-engine tests: an OpenAI-ish server that can be noisy, hang, or fork a worker.

Run as a script: `python chatty_engine.py --port N [--flood] [--hang-file PATH] [--busy-file PATH] ...`.
- `--flood`: before serving, print a 70 KB line, a `\\r` progress bar and 5000 lines of 100 bytes: more
  than a pipe holds, so an engine whose output is not drained blocks before it ever answers.
- `--hang-file PATH`: when PATH exists, the server removes it and from then on answers nothing (a hung
  engine whose process still runs); a restarted copy serves normally.
- `--busy-file PATH`: when PATH exists, /health answers nothing but the engine keeps printing a line
  every 0.1 s and serving other requests (all HTTP threads held by long streams, as an overloaded
  llama-server looks).
- `--worker-pid-file PATH`: fork a worker (in the engine's process group, like vLLM's) and write its PID.
- `--model NAME`: the one model it serves (default `chatty`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FLOOD_LINES = 5000


def flood() -> None:
    out = sys.stdout
    out.write("x" * 70_000 + "\n")
    out.write("".join(f"\rloading weights {n:3d}%" for n in range(101)) + "\n")
    for n in range(FLOOD_LINES):
        out.write(f"{n:06d} " + "y" * 92 + "\n")  # 100 bytes with the line break
    out.write("flood done\n")
    out.flush()


class Engine(BaseHTTPRequestHandler):
    model = "chatty"
    hang_file: Path | None = None
    busy_file: Path | None = None
    hung = threading.Event()
    busy = threading.Event()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _hang_if_asked(self) -> None:
        if self.hang_file is not None and self.hang_file.exists():
            self.hang_file.unlink(missing_ok=True)
            self.hung.set()
            print("now hanging", flush=True)
        if self.hung.is_set():
            time.sleep(3600)

    def _answer(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._hang_if_asked()
        if self.path == "/health" and self.busy_file is not None and self.busy_file.exists():
            if not self.busy.is_set():
                self.busy.set()
                threading.Thread(target=_keep_printing, daemon=True).start()
            time.sleep(3600)
        if self.path == "/health":
            self._answer({"status": "ok"})
        elif self.path == "/v1/models":
            self._answer({"object": "list", "data": [{"id": self.model, "object": "model"}]})
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        self._hang_if_asked()
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        self._answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": request.get("model"),
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "hello from chatty"}}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})


def _keep_printing() -> None:
    for n in range(1_000_000):
        print(f"slot 0: generating token {n}", flush=True)
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="chatty")
    parser.add_argument("--flood", action="store_true")
    parser.add_argument("--hang-file", type=Path)
    parser.add_argument("--worker-pid-file", type=Path)
    parser.add_argument("--busy-file", type=Path)
    parser.add_argument("--api-key")  # accepted and ignored, as a real engine would check it
    args = parser.parse_args()
    if args.worker_pid_file is not None:
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        args.worker_pid_file.write_text(str(worker.pid))
    if args.flood:
        flood()
    Engine.model, Engine.hang_file, Engine.busy_file = args.model, args.hang_file, args.busy_file
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Engine)
    server.daemon_threads = True
    print(f"serving on port {args.port} (pid {os.getpid()})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
