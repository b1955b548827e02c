"""The request id every response carries: the client's own X-Request-Id when it is sane, else a new one."""

from __future__ import annotations

import re
import uuid

from aiohttp import web

_ACCEPTED = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    return given if given and _ACCEPTED.match(given) else uuid.uuid4().hex
