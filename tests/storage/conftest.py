"""Backends for the storage conformance suite: memory, SQLite and PostgreSQL.

Every test that takes ``backend`` (or ``storage``) runs once per backend. SQLite gets a new
migrated file per test. PostgreSQL gets one schema per session on the shared database
(``search_path`` set through the connection's ``options``, so the tables and Alembic's
version table land there), emptied before each test and dropped at the end.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from taskbound.storage import SqlStorage, Storage, open_storage
from taskbound.storage.schema import metadata
from tests.services import postgres_conninfo, postgres_url

BACKENDS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@dataclass
class Backend:
    """One backend under test and the storage opened on it."""

    name: str
    url: str | None
    storage: Storage
    _extra: list[SqlStorage] = field(default_factory=list)

    @property
    def is_sql(self) -> bool:
        return self.url is not None

    def another(self) -> Storage:
        """A second handle on the same data, as another process would hold it: for SQL a
        new :class:`SqlStorage` with its own engine and connections; for memory, which no
        other process can share, the same object."""
        if self.url is None:
            return self.storage
        extra = SqlStorage.from_url(self.url)
        self._extra.append(extra)
        return extra

    async def close(self) -> None:
        for extra in self._extra:
            await extra.close()
        await self.storage.close()


def with_search_path(url: str, schema: str) -> str:
    """``url`` with every connection's ``search_path`` set to ``schema``."""
    return (
        make_url(url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A new empty schema on the test server, dropped afterwards; yields a URL that uses it."""
    name = f"tb_{secrets.token_hex(6)}"
    conninfo = postgres_conninfo(base_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield with_search_path(base_url, name)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_session_url() -> Iterator[str]:
    """The URL of this session's PostgreSQL schema (skips or fails without PostgreSQL)."""
    with postgres_schema(postgres_url()) as url:
        yield url


def _empty_postgres_tables(url: str) -> None:
    tables = sql.SQL(", ").join(sql.Identifier(t.name) for t in metadata.sorted_tables)
    with psycopg.connect(postgres_conninfo(url), autocommit=True) as conn:
        # RESTART IDENTITY: every test's audit log numbers from 1, as on a fresh database.
        conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(tables))


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name: str = request.param
    url: str | None
    if name == "memory":
        url = None
        storage = await open_storage("memory://")
    elif name == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'taskbound.db'}"
        storage = await open_storage(url)
    else:
        url = request.getfixturevalue("postgres_session_url")
        storage = await open_storage(url)
        _empty_postgres_tables(url)
    b = Backend(name, url, storage)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    return backend.storage


def refuse_audit_inserts(url: str) -> None:
    """From now on the SQL database at ``url`` refuses every insert into ``audit_events``,
    with the error a broken store gives."""
    if make_url(url).get_backend_name() == "sqlite":
        path = make_url(url).database
        assert path is not None
        with contextlib.closing(sqlite3.connect(path)) as db:
            # A trigger whose body names a table that is gone: every insert fails with
            # "no such table" (an operational error, as a broken store gives).
            db.executescript(
                "CREATE TABLE tb_gone (x);"
                "CREATE TRIGGER tb_refuse_audit BEFORE INSERT ON audit_events "
                "BEGIN INSERT INTO tb_gone VALUES (1); END;"
                "DROP TABLE tb_gone;"
            )
        return
    # The test role is a superuser, which REVOKE cannot restrain: a trigger refuses with
    # the error a revoked privilege gives.
    with psycopg.connect(postgres_conninfo(url), autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION tb_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'permission denied for table audit_events' "
            "USING ERRCODE = 'insufficient_privilege'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER tb_refuse_audit BEFORE INSERT ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION tb_refuse_audit()"
        )


def allow_audit_inserts(url: str) -> None:
    """Undo :func:`refuse_audit_inserts` (the PostgreSQL schema outlives one test)."""
    if make_url(url).get_backend_name() == "sqlite":
        path = make_url(url).database
        assert path is not None
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("DROP TRIGGER IF EXISTS tb_refuse_audit")
        return
    with psycopg.connect(postgres_conninfo(url), autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS tb_refuse_audit ON audit_events")
        conn.execute("DROP FUNCTION IF EXISTS tb_refuse_audit()")
