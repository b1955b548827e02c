"""The multipart scanner finds the `model` field once, wherever it is, without re-reading parts."""

from __future__ import annotations

import pytest

from synapse_gateway.errors import InvalidRequest
from synapse_gateway.upload import FieldScanner, SecondField, part_names

BOUNDARY = b"XyZ"


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"


def test_finds_model_before_the_file() -> None:
    body = _part("model", b"whisper-1") + _part("file", b"RIFF....", "a.wav") + b"--XyZ--\r\n"
    span = FieldScanner(BOUNDARY, "model").scan(body)
    assert span is not None and body[span[0]:span[1]] == b"whisper-1"


def test_finds_model_after_the_file_fed_in_pieces() -> None:
    body = _part("file", b"x" * 5000, "a.wav") + _part("language", b"en") + _part("model", b"m") + b"--XyZ--\r\n"
    scanner = FieldScanner(BOUNDARY, "model")
    buffer = bytearray()
    spans = []
    for start in range(0, len(body), 700):
        buffer += body[start:start + 700]
        spans.append(scanner.scan(buffer))
    assert spans[-1] is not None and bytes(buffer[spans[-1][0]:spans[-1][1]]) == b"m"
    assert all(s is None for s in spans[:-1])


def test_a_field_named_like_model_is_not_model() -> None:
    body = _part("model_name", b"no") + _part("file", b"..", "model.wav") + b"--XyZ--\r\n"
    assert FieldScanner(BOUNDARY, "model").scan(body) is None


class _CountingBuffer(bytearray):
    """A buffer that adds up how many bytes each `find` had to look at."""

    scanned = 0

    def find(self, sub: bytes, start: int = 0, *args: int) -> int:  # type: ignore[override]
        found = super().find(sub, start, *args)
        end = found + len(sub) if found >= 0 else len(self)  # find stops at its first match
        type(self).scanned += max(0, end - start)
        return found


def test_a_large_part_arriving_in_chunks_is_scanned_about_once() -> None:
    """`model` after an 8 MiB `file` (curl -F file=@... -F model=...): linear, not quadratic, work."""
    boundary = b"b0undary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + b"\x00" * (8 * 2**20) + b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="model"'
            b"\r\n\r\nwhisper-1\r\n--" + boundary + b"--\r\n")
    scanner = FieldScanner(boundary, "model")
    buffer = _CountingBuffer()
    span = None
    for offset in range(0, len(body), 64 * 1024):
        buffer += body[offset:offset + 64 * 1024]
        span = scanner.scan(buffer)
        if span is not None:
            break
    assert span is not None and bytes(buffer[span[0]:span[1]]) == b"whisper-1"
    assert _CountingBuffer.scanned < 3 * len(body), f"scanned {_CountingBuffer.scanned} bytes of {len(body)}"


@pytest.mark.parametrize(("headers", "names"), [
    (b'Content-Disposition: form-data; name="model"', {"model"}),
    (b'content-disposition: form-data; name=model', {"model"}),
    (b'Content-Disposition: form-data; name="file"; filename="a; name=\"model\".wav"', {"file"}),
    (b'X-Note: content-disposition: x; name="model"\r\nContent-Disposition: form-data; name="prompt"', {"prompt"}),
    (b'Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="model"', {"a", "model"}),
])
def test_a_part_is_named_only_by_its_own_content_disposition(headers: bytes, names: set[str]) -> None:
    assert part_names(headers) == names


def test_a_header_line_that_mentions_model_does_not_make_a_model_part() -> None:
    sneaky = (b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\nX-Note: content-disposition: x; '
              b'name="model"\r\n\r\nhello\r\n')
    body = _part("model", b"allowed") + sneaky + b"--XyZ--\r\n"
    span = FieldScanner(BOUNDARY, "model").scan(body)
    assert span is not None and body[span[0]:span[1]] == b"allowed"


def test_a_second_model_field_is_refused_wherever_the_stream_cuts_it() -> None:
    rest = _part("file", b"x" * 3000, "a.wav") + _part("model", b"secret") + b"--XyZ--\r\n"
    for size in (1, 5, 64, 1000, len(rest)):
        watcher = SecondField(BOUNDARY, "model")
        with pytest.raises(InvalidRequest, match="more than one `model`"):
            for start in range(0, len(rest), size):
                watcher.feed(b"\r\n" + rest[start:start + size] if start == 0 else rest[start:start + size])


def test_other_parts_pass_the_watcher() -> None:
    watcher = SecondField(BOUNDARY, "model")
    rest = b"\r\n" + _part("file", b"model" * 100, 'model.wav') + _part("language", b"en") + b"--XyZ--\r\n"
    for start in range(0, len(rest), 7):
        watcher.feed(rest[start:start + 7])
