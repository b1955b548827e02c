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
