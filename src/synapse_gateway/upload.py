"""Multipart uploads (audio files) read only as far as their `model` field; the rest streams through."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from aiohttp import web

from .body import BodyDeadline, check_model_name
from .errors import InvalidRequest, PayloadTooLarge

_MAX_PART_HEAD = 16384  # a part's headers are a few lines; more is not a form a client sends
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def part_names(headers: bytes) -> set[str]:
    """The form names a part's headers give it: the `name` of each `Content-Disposition` line, read as
    a parameter (a `name="model"` inside a quoted filename, or inside another header, is not one)."""
    names = set()
    for line in headers.split(b"\r\n"):
        field, colon, value = line.partition(b":")
        if colon and field.strip().lower() == b"content-disposition":
            name = _parameter(value.decode("utf-8", "replace"), "name")
            if name is not None:
                names.add(name)
    return names


def _parameter(value: str, wanted: str) -> str | None:
    """A parameter of a header value such as `form-data; name="a;b"; filename="x"`, quotes respected."""
    params: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            params.append("".join(current))
            current = []
        else:
            current.append(char)
    params.append("".join(current))
    for param in params[1:]:
        key, equals, found = param.partition("=")
        if equals and key.strip().lower() == wanted:
            return found.strip()
    return None


class FieldScanner:
    """Finds one form field's value in a growing multipart buffer, scanning each byte about once.

    `searched` remembers how far the search for the current part's end got, so a large file part
    that arrives in many chunks is not searched again from its start on every chunk.
    """

    def __init__(self, boundary: bytes, field: str) -> None:
        self.delimiter = b"--" + boundary
        self.field = field
        self.position = 0
        self.searched = 0
        self.finished = False

    def scan(self, buffer: bytes | bytearray) -> tuple[int, int] | None:
        """The (start, end) of the field's value within `buffer`, once the part holding it is complete."""
        while not self.finished:
            start = buffer.find(self.delimiter, self.position)
            if start < 0:
                return None
            head = start + len(self.delimiter)
            if buffer[head:head + 2] == b"--":
                self.finished = True
                return None
            head_end = buffer.find(b"\r\n\r\n", head)
            if head_end < 0:
                if len(buffer) - head > _MAX_PART_HEAD:
                    raise InvalidRequest("a part of the upload has headers over 16 KiB", param="file")
                return None
            names = part_names(bytes(buffer[head:head_end]))
            if len(names) > 1:
                raise InvalidRequest("a part of the upload has two names", param="file")
            closing = b"\r\n" + self.delimiter
            end = buffer.find(closing, max(head_end + 4, self.searched))
            if end < 0:
                self.searched = max(head_end + 4, len(buffer) - len(closing) + 1)
                return None
            if self.field in names:
                return head_end + 4, end
            self.position = end + 2
            self.searched = 0
        return None


class MultipartUpload:
    """An upload whose head has been read up to the `model` field; `body_for` streams the whole of it."""

    def __init__(self, request: web.Request, head: bytearray, span: tuple[int, int], deadline: BodyDeadline,
                 later_parts: SecondField) -> None:
        self.request = request
        self.later_parts = later_parts
        self.head = head
        self.span = span
        self.deadline = deadline
        self.consumed = False
        self.model = bytes(head[span[0]:span[1]]).decode("utf-8", "replace").strip()
        self.content_type = request.headers.get("Content-Type", "")

    @classmethod
    async def read_head(cls, request: web.Request, limit: int, deadline: BodyDeadline) -> MultipartUpload:
        """Read until the `model` field is known (413 past `limit`, 400 for a body that is not multipart)."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit} bytes")
        match = _BOUNDARY.search(request.headers.get("Content-Type", ""))
        if not request.content_type.startswith("multipart/form-data") or not match:
            raise InvalidRequest("send the audio as multipart/form-data with `file` and `model` fields",
                                 param="file", code="invalid_content_type")
        boundary = match.group(1).encode()
        scanner = FieldScanner(boundary, "model")
        head = bytearray()
        # With a Content-Length, read only up to the model field and stream the rest; a chunked upload
        # is read whole (within the limit) so that 413 is decided before a backend sees any of it.
        whole = declared is None
        while (span := scanner.scan(head)) is None or whole:
            chunk = await deadline.read(request.content)
            if not chunk:
                if span is not None:
                    break
                raise InvalidRequest("you must provide a model parameter", param="model", code="missing_model")
            head += chunk
            if len(head) > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
        upload = cls(request, head, span, deadline, SecondField(boundary, "model"))
        check_model_name(upload.model)
        upload.later_parts.feed(bytes(head[span[1]:]))  # what was read past the field, a whole chunked upload
        return upload

    @property
    def replayable(self) -> bool:
        """Only until its stream has been started: the upload is not kept in memory."""
        return not self.consumed

    def __call__(self, upstream_model: str) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """The upload with `model` set to `upstream_model`, as a stream, and the headers that describe it."""
        start, end = self.span
        head = bytes(self.head[:start]) + upstream_model.encode() + bytes(self.head[end:])
        headers = {"Content-Type": self.content_type}
        if self.request.content_length is not None:
            headers["Content-Length"] = str(self.request.content_length + len(head) - len(self.head))
        return self._stream(head), headers

    async def _stream(self, head: bytes) -> AsyncIterator[bytes]:
        self.consumed = True
        yield head
        # Bounded in size by the checked Content-Length, and in time by the deadline: a trickling
        # client must not hold the backend (or a GPU unit) for ever.
        while chunk := await self.deadline.read(self.request.content):
            self.later_parts.feed(chunk)
            yield chunk


class SecondField:
    """Watches the rest of a streamed upload for a second part with the field's name.

    A backend may read the last `model` of a form where the gateway read (and checked) the first, so
    an upload with two is refused: the stream to the backend is cut, and the client gets a 400.
    """

    def __init__(self, boundary: bytes, field: str) -> None:
        self.marker = b"\r\n--" + boundary
        self.field = field
        self.carry = b""

    def feed(self, chunk: bytes) -> None:
        data = self.carry + chunk if self.carry else chunk
        position = 0
        while (found := data.find(self.marker, position)) >= 0:
            head = found + len(self.marker)
            end = data.find(b"\r\n\r\n", head)
            if end < 0:
                if len(data) - head > _MAX_PART_HEAD:
                    raise InvalidRequest("a part of the upload has headers over 16 KiB", param="file")
                self.carry = data[found:]
                return
            if self.field in part_names(data[head:end]):
                raise InvalidRequest(f"the upload has more than one `{self.field}` field", param=self.field)
            position = end
        self.carry = data[max(position, len(data) - len(self.marker) + 1):]
