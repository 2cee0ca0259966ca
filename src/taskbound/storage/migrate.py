"""Schema migrations (Alembic), run from code: users need no ``alembic.ini``.

The revisions live in the package (``storage/migrations``). :func:`migrate` upgrades a
database to the newest one on a sync engine, in one transaction that also serialises
concurrent starts: ``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on
PostgreSQL. The version table lands in the connection's current schema, so a PostgreSQL
``search_path`` (``?options=-csearch_path%3Dname`` in the URL) places everything together.

Developers write a new revision with :func:`alembic_config`, e.g.
``alembic.command.revision(alembic_config(url="sqlite:///dev.db"), "add x", autogenerate=True)``
after upgrading that database to head.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from taskbound.errors import StorageError
from taskbound.storage.sql import (
    POSTGRES_CONNECT_TIMEOUT_S,
    configure_sqlite,
    immediate_begin_option,
    storage_error,
)
from taskbound.storage.urls import DatabaseURL, parse_database_url, prepare_sqlite_file

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# pg_advisory_xact_lock key held while migrating: the bytes of "taskboun" as a bigint.
_POSTGRES_MIGRATION_LOCK = 0x7461736B626F756E


def alembic_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """An Alembic configuration for taskbound's revisions, built in memory.

    ``connection`` (used by :func:`migrate`) is handed to ``env.py``, which then runs inside
    that connection's transaction; otherwise ``env.py`` connects to ``url`` itself.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Revision files are modules mypy checks, so their names must be identifiers.
    config.set_main_option("file_template", "rev_%%(rev)s_%%(slug)s")
    if url is not None:
        # ConfigParser interpolation treats "%" specially; URLs may hold %-escapes.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def migrate(url: str) -> None:
    """Upgrade the SQLite or PostgreSQL database at ``url`` to the newest schema.

    Creates a missing SQLite file (and its directory). Safe to run again, and from several
    processes at once. Raises :class:`~taskbound.errors.ConfigError` for a URL it does not
    support and :class:`~taskbound.errors.StorageError` when the database cannot be reached
    or migrated.
    """
    target = parse_database_url(url)
    await asyncio.to_thread(_upgrade, target)


def _upgrade(target: DatabaseURL) -> None:
    if target.sqlite_path is not None:
        try:
            prepare_sqlite_file(target.sqlite_path)
        except OSError as exc:
            raise StorageError(internal=f"cannot create the SQLite database: {exc}") from exc
        engine = create_engine(target.sync_url, poolclass=NullPool, hide_parameters=True)
        # Foreign keys stay off while migrating: SQLite's table rebuilds need it.
        configure_sqlite(engine, foreign_keys=False)
    else:
        engine = create_engine(
            target.sync_url,
            poolclass=NullPool,
            hide_parameters=True,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        )
    try:
        with engine.connect() as conn:
            if target.dialect == "sqlite":
                conn = conn.execution_options(**immediate_begin_option())
            with conn.begin():
                if target.dialect == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": _POSTGRES_MIGRATION_LOCK},
                    )
                command.upgrade(alembic_config(conn), "head")
    except (SQLAlchemyError, OSError) as exc:
        raise storage_error(exc, target.secrets) from exc
    finally:
        engine.dispose()
