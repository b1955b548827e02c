"""Multipart uploads (audio files) read only as far as their `model` field; the rest streams through."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from aiohttp import web

from .body import BodyDeadline, check_model_name
from .errors import InvalidRequest, PayloadTooLarge

_MODEL_FIELD = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="model"(?:;|\s|$)')
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


class FieldScanner:
    """Finds one form field's value in a growing multipart buffer, scanning each byte about once.

    `searched` remembers how far the search for the current part's end got, so a large file part
    that arrives in many chunks is not searched again from its start on every chunk.
    """

    def __init__(self, boundary: bytes, pattern: re.Pattern[bytes]) -> None:
        self.delimiter = b"--" + boundary
        self.pattern = pattern
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
                return None
            closing = b"\r\n" + self.delimiter
            end = buffer.find(closing, max(head_end + 4, self.searched))
            if end < 0:
                self.searched = max(head_end + 4, len(buffer) - len(closing) + 1)
                return None
            if self.pattern.search(buffer, head, head_end + 2):
                return head_end + 4, end
            self.position = end + 2
            self.searched = 0
        return None


class MultipartUpload:
    """An upload whose head has been read up to the `model` field; `body_for` streams the whole of it."""

    def __init__(self, request: web.Request, head: bytearray, span: tuple[int, int], deadline: BodyDeadline) -> None:
        self.request = request
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
        scanner = FieldScanner(match.group(1).encode(), _MODEL_FIELD)
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
        upload = cls(request, head, span, deadline)
        check_model_name(upload.model)
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
            yield chunk
