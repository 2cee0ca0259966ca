"""A dedicated PostgreSQL connection that follows the revocation log: it LISTENs on the
channel every revoking transaction notifies on commit, and reads the log over that same
connection, so a broken connection is a broken feed (never a feed that looks fine while its
notifications are lost)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from taskbound.core.model import Revocation
from taskbound.storage import codec
from taskbound.storage import schema as t
from taskbound.storage.sql import REVOCATION_CHANNEL, create_engine_for, storage_error
from taskbound.storage.urls import parse_database_url


class PostgresListener:
    def __init__(self, url: str) -> None:
        self._target = parse_database_url(url)
        if self._target.dialect != "postgresql":
            raise ValueError("the revocation listener needs a PostgreSQL URL")
        self._engine: AsyncEngine | None = None
        self._conn: AsyncConnection | None = None
        self._driver: Any = None

    async def open(self) -> None:
        """Connect and LISTEN. Raises StorageError when the database cannot be reached."""
        await self.close()
        try:
            # TCP keepalives and a user timeout: a silently dead route (no RST) fails the
            # connection within seconds, instead of hanging a query until the OS gives up.
            self._engine = create_engine_for(
                self._target,
                poolclass=NullPool,
                connect_args={
                    "keepalives": 1,
                    "keepalives_idle": 2,
                    "keepalives_interval": 1,
                    "keepalives_count": 2,
                    "tcp_user_timeout": 3000,
                },
            )
            conn = await self._engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await self._conn.exec_driver_sql(f"LISTEN {REVOCATION_CHANNEL}")
            raw = await self._conn.get_raw_connection()
            # Notifications that arrive while a query runs are kept by psycopg and handed
            # out by the next notifies() call; those that arrive while waiting, at once.
            self._driver = raw.driver_connection
        except (SQLAlchemyError, OSError) as exc:
            await self.close()
            raise storage_error(exc, self._target.secrets) from exc

    async def fetch(
        self, *, after: int, limit: int, live_at: datetime | None = None
    ) -> list[Revocation]:
        """The log after ``after`` over the listening connection (see list_revocations)."""
        if self._conn is None:
            raise storage_error(ConnectionError("listener is not open"), self._target.secrets)
        codec.check_revocation_query(after, limit)
        c = t.revocations.c
        query = select(t.revocations).where(c.seq > after).order_by(c.seq).limit(limit)
        if live_at is not None:
            query = query.where(c.expires_at.is_(None) | (c.expires_at > codec.utc(live_at)))
        try:
            rows = (await self._conn.execute(query)).mappings().all()
        except (SQLAlchemyError, OSError) as exc:
            raise storage_error(exc, self._target.secrets) from exc
        return [codec.revocation_from(r) for r in rows]

    async def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a notification; True when one came."""
        if self._driver is None:
            raise storage_error(ConnectionError("listener is not open"), self._target.secrets)
        try:
            async for _ in self._driver.notifies(timeout=seconds, stop_after=1):
                return True
        except Exception as exc:  # psycopg.OperationalError and friends: the feed is broken
            raise storage_error(exc, self._target.secrets) from exc
        return False

    async def close(self) -> None:
        conn, engine = self._conn, self._engine
        self._conn = self._engine = self._driver = None
        if conn is not None:
            # Closing a broken connection may fail; it is gone anyway.
            with contextlib.suppress(Exception):
                await conn.close()
        if engine is not None:
            await engine.dispose()
