"""An engine's console output, drained in chunks and cut into lines of bounded length.

A child whose pipe is not read blocks in write() and stops serving, so the reader must never stop
while the child runs: no line is too long (vLLM logs whole prompts), `\\r` progress bars count as
lines, and a failure to handle one line does not end the reading.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

CHUNK = 64 * 1024
MAX_LINE = 4096  # characters kept of one line; the rest is counted, not stored
_BREAK = re.compile(rb"\r\n|\r|\n")


class LineSplitter:
    """Cuts a byte stream into lines at `\\n`, `\\r\\n` or `\\r`; a long line is cut to `max_line` characters."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._head = bytearray()  # the start of the current line, at most max_line bytes
        self._dropped = 0  # bytes of the current line past max_line
        self._pending_cr = False  # the last chunk ended in "\r": a "\n" next is part of the same break

    def feed(self, data: bytes) -> list[str]:
        """The lines completed by `data` (blank lines left out)."""
        if self._pending_cr and data.startswith(b"\n"):
            data = data[1:]
        self._pending_cr = data.endswith(b"\r")
        lines: list[str] = []
        start = 0
        for match in _BREAK.finditer(data):
            self._keep(data[start:match.start()])
            lines.extend(self._take())
            start = match.end()
        self._keep(data[start:])
        return lines

    def flush(self) -> list[str]:
        """The last line, if the stream ended without a line break."""
        return self._take()

    def _keep(self, piece: bytes) -> None:
        room = self.max_line - len(self._head)
        self._head += piece[:room]
        self._dropped += max(0, len(piece) - room)

    def _take(self) -> list[str]:
        line = bytes(self._head).decode(errors="replace").rstrip()
        if self._dropped:
            line += f" ... ({self._dropped} more bytes)"
        self._head.clear()
        self._dropped = 0
        return [line] if line else []


async def drain(stream: asyncio.StreamReader, on_line: Callable[[str], None], log: logging.Logger) -> None:
    """Read `stream` to its end in chunks and hand each line to `on_line`; errors in `on_line` are logged.

    Returns at end of stream. A read that fails (the pipe itself broke) is raised: nothing can drain that
    pipe any more, so the caller must stop the child rather than let it block.
    """
    splitter = LineSplitter()
    while True:
        chunk = await stream.read(CHUNK)
        lines = splitter.feed(chunk) if chunk else splitter.flush()
        for line in lines:
            try:
                on_line(line)
            except Exception:  # a log handler failed: drop the line, never the reading
                log.exception("could not handle a line of engine output")
        if not chunk:
            return
