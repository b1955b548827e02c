"""LineSplitter: lines at \\n, \\r\\n and \\r, across chunk boundaries, cut to a bounded length."""

from __future__ import annotations

import asyncio
import logging

from synapse_gateway.engines.output import LineSplitter, drain


def test_lines_are_cut_at_every_kind_of_break_even_across_chunks() -> None:
    splitter = LineSplitter()
    lines = [*splitter.feed(b"one\ntw"), *splitter.feed(b"o\r\nthree\r"), *splitter.feed(b"\nfour\rfive")]
    assert lines == ["one", "two", "three", "four"]
    assert splitter.flush() == ["five"]


def test_a_progress_bar_is_a_line_per_update() -> None:
    bar = b"".join(b"\rloading %d%%" % n for n in (10, 50, 100)) + b"\n"
    assert LineSplitter().feed(bar) == ["loading 10%", "loading 50%", "loading 100%"]


def test_a_long_line_is_kept_short_and_says_how_much_was_dropped() -> None:
    splitter = LineSplitter(max_line=10)
    lines = [*splitter.feed(b"a" * 70_000), *splitter.feed(b"b" * 5 + b"\nnext\n")]
    assert lines == ["a" * 10 + " ... (69995 more bytes)", "next"]


async def test_drain_reads_everything_and_survives_a_failing_handler() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(b"x" * 100_000 + b"\n" + b"".join(b"line %d\n" % n for n in range(3000)))
    stream.feed_eof()
    seen: list[str] = []

    def handle(line: str) -> None:
        if line == "line 7":
            raise RuntimeError("a log handler broke")
        seen.append(line)

    await drain(stream, handle, logging.getLogger("test"))
    assert len(seen) == 3000 and seen[-1] == "line 2999" and "line 7" not in seen
