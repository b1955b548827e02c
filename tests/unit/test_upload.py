"""The multipart scanner finds the `model` field once, wherever it is, without re-reading parts."""

from __future__ import annotations

from synapse_gateway.upload import _MODEL_FIELD, FieldScanner

BOUNDARY = b"XyZ"


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"


def test_finds_model_before_the_file() -> None:
    body = _part("model", b"whisper-1") + _part("file", b"RIFF....", "a.wav") + b"--XyZ--\r\n"
    span = FieldScanner(BOUNDARY, _MODEL_FIELD).scan(body)
    assert span is not None and body[span[0]:span[1]] == b"whisper-1"


def test_finds_model_after_the_file_fed_in_pieces() -> None:
    body = _part("file", b"x" * 5000, "a.wav") + _part("language", b"en") + _part("model", b"m") + b"--XyZ--\r\n"
    scanner = FieldScanner(BOUNDARY, _MODEL_FIELD)
    buffer = bytearray()
    spans = []
    for start in range(0, len(body), 700):
        buffer += body[start:start + 700]
        spans.append(scanner.scan(buffer))
    assert spans[-1] is not None and bytes(buffer[spans[-1][0]:spans[-1][1]]) == b"m"
    assert all(s is None for s in spans[:-1])


def test_a_field_named_like_model_is_not_model() -> None:
    body = _part("model_name", b"no") + _part("file", b"..", "model.wav") + b"--XyZ--\r\n"
    assert FieldScanner(BOUNDARY, _MODEL_FIELD).scan(body) is None


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
    scanner = FieldScanner(boundary, _MODEL_FIELD)
    buffer = _CountingBuffer()
    span = None
    for offset in range(0, len(body), 64 * 1024):
        buffer += body[offset:offset + 64 * 1024]
        span = scanner.scan(buffer)
        if span is not None:
            break
    assert span is not None and bytes(buffer[span[0]:span[1]]) == b"whisper-1"
    assert _CountingBuffer.scanned < 3 * len(body), f"scanned {_CountingBuffer.scanned} bytes of {len(body)}"
