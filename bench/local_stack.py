#!/usr/bin/env python3
"""Measures the embedded local stack: start-up (cold and warm), memory per engine, STT speed, TTS latency.

Run from the project root after `make serve` has installed everything once:
    .venv/bin/python bench/local_stack.py
It starts `synapse serve` (no config) twice on a free port, with a fresh model cache for the cold start,
and prints a Markdown table. Nothing outside 127.0.0.1 is contacted.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx

SPEECH = ("The gateway routes every request to the right engine. It wakes what a request needs and puts "
          "the rest to sleep, so that one card can serve many models.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_stack(cache: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """Start `synapse serve`; return it, its URL and the seconds until every engine was ready."""
    port = free_port()
    env = {**os.environ, "SYNAPSE_CACHE_DIR": str(cache), "OLLAMA_HOST": f"127.0.0.1:{free_port()}"}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "synapse_gateway", "serve", "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            engines = httpx.get(url + "/admin/engines", timeout=1).json()["engines"]
            if engines and all(e["state"] == "ready" for e in engines):
                return process, url, time.monotonic() - started
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() - started > 300:
            raise SystemExit("the stack did not come up")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(30)


def measure_audio(http: httpx.Client) -> dict[str, float]:
    wav = http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": SPEECH * 2,
                                               "response_format": "wav"}).content
    with wave.open(io.BytesIO(wav)) as reader:  # a streamed WAV's header cannot know its length: count bytes
        frame_bytes = reader.getsampwidth() * reader.getnchannels()
        seconds = (len(wav) - 44) / frame_bytes / reader.getframerate()
    times = []
    for _ in range(4):  # the first includes loading the model
        begin = time.perf_counter()
        answer = http.post("/v1/audio/transcriptions", files={"file": ("s.wav", wav, "audio/wav")},
                           data={"model": "whisper-1"})
        answer.raise_for_status()
        times.append(time.perf_counter() - begin)
    ttfb, total = [], []
    for _ in range(5):
        begin = time.perf_counter()
        with http.stream("POST", "/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": SPEECH,
                                                          "response_format": "pcm"}) as stream:
            chunks = stream.iter_raw()
            next(chunks)
            ttfb.append(time.perf_counter() - begin)
            for _ in chunks:
                pass
            total.append(time.perf_counter() - begin)
    steady = statistics.median(times[1:])
    return {"clip_s": seconds, "stt_first_s": times[0], "stt_s": steady, "rtf": steady / seconds,
            "tts_ttfb_s": statistics.median(ttfb), "tts_total_s": statistics.median(total)}


def measure_text(http: httpx.Client) -> dict[str, float]:
    begin = time.perf_counter()
    answer = http.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 128, "messages": [
        {"role": "user", "content": "Write a short paragraph about the sea."}]}).json()
    chat_s = time.perf_counter() - begin
    tokens = answer["usage"]["completion_tokens"]
    batch = [f"sentence number {i} to embed" for i in range(32)]
    embed = []
    for _ in range(4):
        begin = time.perf_counter()
        http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": batch}).raise_for_status()
        embed.append(time.perf_counter() - begin)
    return {"chat_tokens_per_s": tokens / chat_s, "embed_32_ms": statistics.median(embed[1:]) * 1000,
            "embed_first_ms": embed[0] * 1000}


def main() -> None:
    cache = Path(tempfile.mkdtemp(prefix="synapse-bench-cache-"))
    try:
        process, _, cold = start_stack(cache)
        stop(process)
        process, url, warm = start_stack(cache)
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                audio = measure_audio(http)
                text = measure_text(http)
                engines = http.get("/admin/engines").json()["engines"]
            gateway_rss = rss_mib(process.pid)
        finally:
            stop(process)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("| measure | value |\n|---|---|")
    print(f"| start-up until every engine is ready, cold (fresh model cache) | {cold:.1f} s |")
    print(f"| start-up until every engine is ready, warm | {warm:.1f} s |")
    print(f"| gateway RSS | {gateway_rss:.0f} MiB |")
    for engine in engines:
        print(f"| {engine['name']} engine RSS (after the runs below) | {engine['rss_bytes'] / 2**20:.0f} MiB |")
    print(f"| transcription of a {audio['clip_s']:.1f} s clip, first call (loads Whisper) | "
          f"{audio['stt_first_s']:.2f} s |")
    print(f"| transcription, steady (median of 3) | {audio['stt_s']:.2f} s, real-time factor {audio['rtf']:.3f} |")
    print(f"| speech time-to-first-byte, 2 sentences, pcm (median of 5) | {audio['tts_ttfb_s'] * 1000:.0f} ms |")
    print(f"| speech total, same input | {audio['tts_total_s'] * 1000:.0f} ms |")
    print(f"| chat, SmolLM2-135M Q4_1, 128 tokens | {text['chat_tokens_per_s']:.0f} tokens/s |")
    print(f"| embeddings, 32 sentences in one request: first, then median of 3 | "
          f"{text['embed_first_ms']:.0f} ms, {text['embed_32_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
