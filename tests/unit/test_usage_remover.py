"""The usage-only chunk the gateway asked for is taken out of a stream whose client did not ask."""

from __future__ import annotations

import orjson
import pytest

from synapse_gateway.forwarding.relay import UsageRemover


def _event(data: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


CHUNKS = [_event({"choices": [{"delta": {"content": word}}], "usage": None}) for word in ("Hello", " there")]
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
DONE = b"data: [DONE]\n\n"
STREAM = b"".join(CHUNKS) + USAGE + DONE


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_the_usage_chunk_is_removed_however_the_stream_is_cut(size: int) -> None:
    remover = UsageRemover()
    out = b"".join(remover.feed(STREAM[i:i + size]) for i in range(0, len(STREAM), size)) + remover.rest()
    assert out == b"".join(CHUNKS) + DONE


def test_a_usage_field_in_a_chunk_with_choices_is_kept() -> None:
    with_choices = _event({"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 1}})
    remover = UsageRemover()
    assert remover.feed(with_choices) == with_choices


def test_an_unterminated_tail_is_passed_on_at_the_end() -> None:
    remover = UsageRemover()
    assert remover.feed(CHUNKS[0] + b"data: {\"partial") == CHUNKS[0]
    assert remover.rest() == b"data: {\"partial"
