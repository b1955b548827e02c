"""Real services the tests talk to (Redis, PostgreSQL): skipped with a reason when absent, failed under CI.

SYNAPSE_REQUIRE_SERVICES=1 (set by `.ci/run`) turns a missing service into a failure, so a run
cannot pass by skipping.
"""

from __future__ import annotations

import os
import socket

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
