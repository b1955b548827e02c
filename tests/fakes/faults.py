"""Faults a fake can inject into the routes a lifecycle driver uses: what a network or a sick server does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from aiohttp import web

from ._base import json_response

# disconnect: the connection closes before an answer (aiohttp: ServerDisconnectedError)
# truncated:  the body stops short of its Content-Length (aiohttp: ClientPayloadError)
# bad-json:   200 with a body that is not JSON;  wrong-shape: 200 with JSON of the wrong shape
# hang:       no answer until the fault is cleared or the fake stops (the client's own timeout fires)
Fault = Literal["disconnect", "truncated", "bad-json", "wrong-shape", "hang"]
FAULTS: tuple[Fault, ...] = ("disconnect", "truncated", "bad-json", "wrong-shape", "hang")


async def faulty_answer(request: web.Request, fault: Fault | None,
                        hanging: Callable[[], bool]) -> web.StreamResponse | None:
    """The answer `fault` gives to `request`, or None to answer normally (also once a hang is over)."""
    if fault is None:
        return None
    await request.read()
    if fault == "disconnect":
        if request.transport is not None:
            request.transport.close()
        return web.Response()
    if fault == "truncated":
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"is_sleeping": fal')
        if request.transport is not None:
            request.transport.close()
        return response
    if fault == "bad-json":
        return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
    if fault == "wrong-shape":
        return json_response(["not", "an", "object"])
    while hanging():  # the fake's stop cancels this handler
        await asyncio.sleep(0.01)
    return None
