"""Migrations match ``schema.py`` on both dialects; ``open_storage`` and ``migrate`` behave."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from taskbound.core.clock import FakeClock
from taskbound.errors import ConfigError, StorageError
from taskbound.storage import MemoryStorage, SqlStorage, migrate, open_storage
from taskbound.storage.migrate import alembic_config
from taskbound.storage.schema import metadata
from taskbound.storage.urls import parse_database_url
from tests.services import postgres_conninfo, postgres_url
from tests.storage.conftest import postgres_schema
from tests.storage.test_conformance import make_owner

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def _diff(sync_url: str) -> list[object]:
    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert context.get_current_revision() == HEAD
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _tables(sync_url: str) -> set[str]:
    engine = create_engine(sync_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _sync(url: str) -> str:
    return parse_database_url(url).sync_url.render_as_string(hide_password=False)


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A URL on a new, empty PostgreSQL schema of its own."""
    with postgres_schema(postgres_url()) as url:
        yield url


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert heads == [HEAD]


async def test_sqlite_migrations_match_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tb.db'}"
    await migrate(url)
    assert _diff(_sync(url)) == []
    assert _tables(_sync(url)) == {*metadata.tables, "alembic_version"}


@pytest.mark.postgres
async def test_postgres_migrations_match_schema(fresh_postgres: str) -> None:
    await migrate(fresh_postgres)
    assert _diff(_sync(fresh_postgres)) == []


@pytest.mark.postgres
async def test_postgres_version_table_lands_in_the_schema(fresh_postgres: str) -> None:
    await migrate(fresh_postgres)
    with psycopg.connect(postgres_conninfo(fresh_postgres)) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        assert schema[0].startswith("tb_")
        found = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema[0],),
        ).fetchall()
    assert {name for (name,) in found} == {*metadata.tables, "alembic_version"}


async def test_downgrade_then_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tb.db'}"
    await migrate(url)
    command.downgrade(alembic_config(url=url), "base")
    assert _tables(url) == {"alembic_version"}
    await migrate(url)
    assert _diff(url) == []


async def test_open_storage_twice_on_sqlite_keeps_data(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'tb.db'}"
    first = await open_storage(url)
    assert isinstance(first, SqlStorage)
    await first.create_owner(make_owner(clock.now()))
    await first.close()
    await migrate(url)
    second = await open_storage(url)
    try:
        assert await second.get_owner("alice") == make_owner(clock.now())
    finally:
        await second.close()
    assert _diff(_sync(url)) == []


@pytest.mark.postgres
async def test_migrate_twice_on_postgres(fresh_postgres: str, clock: FakeClock) -> None:
    storage = await open_storage(fresh_postgres)
    try:
        await storage.create_owner(make_owner(clock.now()))
    finally:
        await storage.close()
    again = await open_storage(fresh_postgres)
    try:
        assert await again.get_owner("alice") == make_owner(clock.now())
    finally:
        await again.close()


async def test_sqlite_file_and_directory_are_created_private(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "taskbound.db"
    storage = await open_storage(f"sqlite+aiosqlite:///{path}")
    try:
        await storage.check()
    finally:
        await storage.close()
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "tb.db"
    storage = await open_storage(f"sqlite:///{path}")
    await storage.close()
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


async def test_memory_url() -> None:
    storage = await open_storage("memory://")
    assert isinstance(storage, MemoryStorage)
    with pytest.raises(ConfigError):
        await open_storage("memory://somewhere")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:pw@db/taskbound",
        "postgresql+asyncpg://db/taskbound",
        "redis://localhost",
        "not a url",
        "",
        "sqlite://",
        "sqlite:///:memory:",
    ],
)
async def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await open_storage(url)
    assert "pw" not in caught.value.detail


async def test_unreachable_postgres_is_storage_error_without_password() -> None:
    # Port 1 on loopback refuses at once; no server is needed for this test.
    url = "postgresql+psycopg://root:hunter2-secret@127.0.0.1:1/test"
    with pytest.raises(StorageError) as caught:
        await open_storage(url)
    error = caught.value
    assert error.detail == StorageError.default_detail
    for text in (error.detail, error.internal, str(error), repr(error)):
        assert "hunter2-secret" not in text
    assert "hunter2-secret" not in str(error.__cause__)

    storage = SqlStorage.from_url(url)
    try:
        with pytest.raises(StorageError) as caught:
            await storage.check()
        assert "hunter2-secret" not in caught.value.internal
    finally:
        await storage.close()


async def test_unopenable_sqlite_is_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        await open_storage(f"sqlite:///{blocker / 'tb.db'}")
    storage = SqlStorage.from_url(f"sqlite:///{blocker / 'tb.db'}")
    try:
        with pytest.raises(StorageError):
            await storage.check()
    finally:
        await storage.close()
