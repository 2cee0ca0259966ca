"""Where the test suite finds real services (PostgreSQL, Redis), and what it does without them.

Each function returns the service URL from the environment after checking the service
answers. When the variable is unset or the service is down the calling test is skipped,
unless ``TASKBOUND_REQUIRE_SERVICES=1`` (CI sets it), in which case it fails: a CI run must
never pass by skipping the backends it is meant to test.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import NoReturn
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_ENV = "TASKBOUND_TEST_POSTGRES_URL"
REDIS_ENV = "TASKBOUND_TEST_REDIS_URL"
REQUIRE_ENV = "TASKBOUND_REQUIRE_SERVICES"

_PROBE_TIMEOUT_S = 3


def postgres_url() -> str:
    """The test PostgreSQL URL (``postgresql+psycopg://…``), or skip/fail the test."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        _unavailable(f"set {POSTGRES_ENV} to run against PostgreSQL")
    problem = _probe_postgres(url)
    if problem:
        _unavailable(f"PostgreSQL from {POSTGRES_ENV} is unreachable: {problem}")
    return url


def redis_url() -> str:
    """The test Redis URL (``redis://…``), or skip/fail the test."""
    url = os.environ.get(REDIS_ENV)
    if not url:
        _unavailable(f"set {REDIS_ENV} to run against Redis")
    problem = _probe_redis(url)
    if problem:
        _unavailable(f"Redis from {REDIS_ENV} is unreachable: {problem}")
    return url


def postgres_conninfo(url: str) -> str:
    """A libpq connection string for a SQLAlchemy PostgreSQL URL (for plain psycopg)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _probe_postgres(url: str) -> str | None:
    try:
        with psycopg.connect(postgres_conninfo(url), connect_timeout=_PROBE_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure means "not usable"; the reason is reported
        return f"{type(exc).__name__}: {exc}".strip()
    return None


@functools.cache
def _probe_redis(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return f"not a redis:// URL (scheme {parts.scheme!r})"
    try:
        with socket.create_connection(
            (parts.hostname or "localhost", parts.port or 6379), timeout=_PROBE_TIMEOUT_S
        ) as sock:
            if parts.scheme == "redis":
                # Any RESP reply (+PONG, or -NOAUTH when a password is needed) means Redis.
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                if reply[:1] not in (b"+", b"-"):
                    return f"unexpected reply to PING: {reply!r}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
