"""Real services the tests talk to (Redis, PostgreSQL): skipped with a reason when absent, failed under CI.

SYNAPSE_REQUIRE_SERVICES=1 (set by `.ci/run`) turns a missing service into a failure, so a run
cannot pass by skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading

import pytest

ENV_REQUIRE = "SYNAPSE_REQUIRE_SERVICES"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432
POSTGRES_URL = os.environ.get("SYNAPSE_TEST_POSTGRES_URL", f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test")


def _missing(reason: str) -> None:
    if os.environ.get(ENV_REQUIRE, "").strip() == "1":
        pytest.fail(f"{reason} ({ENV_REQUIRE}=1)", pytrace=False)
    pytest.skip(reason)


def require_redis() -> str:
    """The test Redis's URL; skip (or fail under CI) when no Redis answers PING."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return REDIS_URL
    except OSError:
        pass
    _missing(f"no Redis answers at {REDIS_HOST}:{REDIS_PORT} (start one: `redis-server --daemonize yes`)")
    raise AssertionError("unreachable")


def require_postgres() -> str:
    """The test PostgreSQL's URL (database `test`); skip (or fail under CI) when nothing listens."""
    try:
        with socket.create_connection((POSTGRES_HOST, POSTGRES_PORT), timeout=1):
            return POSTGRES_URL
    except OSError:
        pass
    _missing(f"no PostgreSQL listens at {POSTGRES_HOST}:{POSTGRES_PORT} "
             "(start one with a database `test`, or set SYNAPSE_TEST_POSTGRES_URL)")
    raise AssertionError("unreachable")


async def drop_redis_keys(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key a test wrote under `prefix`."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class CuttableRelay:
    """A TCP relay in front of a real service, run on its own thread: `cut()` stages an outage (the
    port refuses and open connections drop), `restore()` ends it on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> CuttableRelay:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(5)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
