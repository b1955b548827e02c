"""Test helpers: word error counting, WAV wrapping, and reading a chunked response off a raw socket."""

from __future__ import annotations

import asyncio
import io
import re
import time
import wave

import orjson

FOX = "The quick brown fox jumps over the lazy dog."
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def words(text: str) -> list[str]:
    """Lower-case words without punctuation."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def word_errors(expected: str, heard: str) -> int:
    """Word-level edit distance (substitutions, insertions, deletions)."""
    want, got = words(expected), words(heard)
    row = list(range(len(got) + 1))
    for i, word in enumerate(want, start=1):
        previous, row[0] = row[0], i
        for j, other in enumerate(got, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


def wav_of_pcm(pcm: bytes, rate: int) -> bytes:
    """Raw 16-bit mono samples wrapped in a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return buffer.getvalue()


async def start_post(url: str, path: str, body: dict[str, object]) -> tuple[Connection, dict[str, str]]:
    """POST JSON over a raw socket and read the response head; the open connection and the headers."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = orjson.dumps(body)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    headers[":status"] = head[0].split()[1]
    return (reader, writer), headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body (empty at the end), exactly as the server framed it."""
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def post_chunked(url: str, path: str, body: dict[str, object]) -> tuple[dict[str, str], list[tuple[float, int]]]:
    """POST JSON over a raw socket; the response headers and, per HTTP chunk, (arrival time, size)."""
    (reader, writer), headers = await start_post(url, path, body)
    try:
        chunks: list[tuple[float, int]] = []
        while chunk := await read_chunk(reader):
            chunks.append((time.perf_counter(), len(chunk)))
        return headers, chunks
    finally:
        writer.close()
        await writer.wait_closed()
