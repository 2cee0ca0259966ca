"""Database URLs: which backend a URL names, and the async and sync forms of it.

The broker runs on the async drivers (``sqlite+aiosqlite``, ``postgresql+psycopg``); Alembic
migrations run on the sync ones (``sqlite``, ``postgresql+psycopg``, which psycopg 3 serves in
both modes). Errors never repeat the URL, which may carry a password.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from taskbound.errors import ConfigError

_SQLITE_DRIVERS = frozenset({"sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"})
_POSTGRES_DRIVERS = frozenset({"postgresql", "postgresql+psycopg"})


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A validated SQL database URL in the forms the engines need."""

    dialect: Literal["sqlite", "postgresql"]
    async_url: URL
    sync_url: URL
    sqlite_path: Path | None

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never appear in an error message (the password, if any)."""
        password = self.async_url.password
        return (str(password),) if password else ()


def parse_database_url(url: str) -> DatabaseURL:
    """Parse a SQLite or PostgreSQL URL; anything else raises :class:`ConfigError`."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("the database URL is not valid") from None
    driver = parsed.drivername
    if driver in _SQLITE_DRIVERS:
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            # An in-memory SQLite database would not survive the separate migration engine;
            # memory:// is the in-process backend.
            raise ConfigError("a SQLite URL must name a file; memory:// is the in-memory store")
        return DatabaseURL(
            dialect="sqlite",
            async_url=parsed.set(drivername="sqlite+aiosqlite"),
            sync_url=parsed.set(drivername="sqlite"),
            sqlite_path=Path(database),
        )
    if driver in _POSTGRES_DRIVERS:
        psycopg_url = parsed.set(drivername="postgresql+psycopg")
        return DatabaseURL(
            dialect="postgresql", async_url=psycopg_url, sync_url=psycopg_url, sqlite_path=None
        )
    raise ConfigError(f"unsupported database URL scheme {driver!r}")


def prepare_sqlite_file(path: Path) -> None:
    """Create the database's parent directory and an empty file readable only by its owner.

    The database holds encrypted secrets and token hashes, so a new file starts at mode 0600
    (SQLite gives its -wal and -shm files the same mode). An existing file is left alone.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
