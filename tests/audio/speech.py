"""Test helpers: word errors, WAV wrapping, chunked responses off a raw socket, streaming and Ogg checks."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import time
import wave
from dataclasses import dataclass

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
        if headers.get("transfer-encoding") != "chunked":  # a body sent whole: one "chunk", for the checks
            whole = await reader.read()
            return headers, [(time.perf_counter(), len(whole))]
        while chunk := await read_chunk(reader):
            chunks.append((time.perf_counter(), len(chunk)))
        return headers, chunks
    finally:
        writer.close()
        await writer.wait_closed()


def assert_streamed(started: float, chunks: list[tuple[float, int]]) -> None:
    """The body came over time, not in one burst: most of the wait lies between the first and last chunk.

    Buffered whole, every chunk would arrive within milliseconds of the last. Streamed, the first sentence
    arrives while the others are still being synthesized, so it holds even if that sentence is slow.
    """
    assert len(chunks) >= 2, chunks
    first, last = chunks[0][0] - started, chunks[-1][0] - started
    assert last - first > 0.3 * last, (first, last)


@dataclass(frozen=True, slots=True)
class OggPage:
    """One Ogg page, as RFC 3533 lays it out."""

    flags: int
    granule: int
    serial: int
    sequence: int
    body: bytes

    @property
    def first(self) -> bool:
        return bool(self.flags & 0x02)

    @property
    def last(self) -> bool:
        return bool(self.flags & 0x04)


def _ogg_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, initial value 0)."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
    return crc


def ogg_pages(data: bytes) -> list[OggPage]:
    """Every page of an Ogg stream; fails unless the bytes are whole pages with correct checksums."""
    pages: list[OggPage] = []
    offset = 0
    while offset < len(data):
        assert data[offset:offset + 4] == b"OggS" and data[offset + 4] == 0, f"no page header at {offset}"
        flags = data[offset + 5]
        granule, serial, sequence, crc = struct.unpack_from("<qIII", data, offset + 6)
        segments = data[offset + 26]
        lacing = data[offset + 27:offset + 27 + segments]
        size = 27 + segments + sum(lacing)
        page = bytearray(data[offset:offset + size])
        assert len(page) == size, f"the page at {offset} is cut short"
        page[22:26] = b"\0\0\0\0"
        assert ogg_crc(bytes(page)) == crc, f"bad checksum in page {sequence}"
        pages.append(OggPage(flags, granule, serial, sequence, bytes(page[27 + segments:])))
        offset += size
    return pages
