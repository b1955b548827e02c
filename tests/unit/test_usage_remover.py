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


@pytest.mark.parametrize("ending", [b"\r\n\r\n", b"\r\r"])
def test_other_line_endings_and_no_space_after_data(ending: bytes) -> None:
    events = [b'data:{"choices":[{"delta":{"content":"a"}}]}', b'data:{"choices":[],"usage":{"prompt_tokens":1}}',
              b"data: [DONE]"]
    stream = b"".join(event + ending for event in events)
    remover = UsageRemover()
    first = remover.feed(stream[:len(events[0]) + len(ending)])
    assert first == events[0] + ending, "a whole event is passed on at once"
    rest = remover.feed(stream[len(first):]) + remover.rest()
    assert rest == events[2] + ending


def test_the_tail_reads_usage_whatever_the_line_ending() -> None:
    from synapse_gateway.forwarding.relay import UsageTail

    tail = UsageTail()
    tail.feed(b'data:{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\r\n\r\ndata: [DONE]\r\n\r\n')
    assert tail.usage() == {"prompt_tokens": 4, "completion_tokens": 2}
