"""The SQL backend: SQLAlchemy Core on the async engine, for SQLite and PostgreSQL.

Every method is one transaction, and concurrency is the database's job: unique constraints
decide races between inserts, conditional UPDATEs (``... WHERE state = 'active'``) decide
races between state changes, and ``add_credential`` checks the task and inserts in one
``INSERT ... SELECT`` that takes a share lock on the task row on PostgreSQL, so a credential
can never be added to a task that another process is ending. On SQLite every writing
transaction starts with ``BEGIN IMMEDIATE``, so writers queue on the database lock (up to
the busy timeout) instead of failing when a read turns into a write.

Audit appends are serialised too (an advisory lock on PostgreSQL, BEGIN IMMEDIATE on
SQLite), so audit sequence numbers are handed out in commit order: a reader paging with
``list_audit(after=n)`` never misses a record that commits late with a lower number.

Errors: a unique violation is :class:`~taskbound.errors.Conflict`, a foreign-key violation
:class:`~taskbound.errors.ReferenceError_`, and a lost or failing database
:class:`~taskbound.errors.StorageError`, whose text never contains the URL's password and
whose chained exception never contains statement parameters (``hide_parameters``).

Orderings are those of :mod:`taskbound.storage` (the in-memory twin sorts the same way);
text is compared by code point (``COLLATE "C"`` on PostgreSQL, SQLite's default ``BINARY``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Engine,
    Insert,
    Table,
    case,
    event,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from taskbound.core.model import (
    AdminToken,
    Agent,
    AgentState,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    KeyState,
    Owner,
    SigningKey,
    Task,
    TaskFilter,
    TaskState,
    Tool,
)
from taskbound.errors import Conflict, NotFound, ReferenceError_, StorageError, TaskboundError
from taskbound.storage import codec
from taskbound.storage import schema as t
from taskbound.storage.base import GrantInputs
from taskbound.storage.urls import DatabaseURL, parse_database_url, redact

SQLITE_BUSY_TIMEOUT_MS = 5_000
POSTGRES_CONNECT_TIMEOUT_S = 10

_BEGIN_OPTION = "taskbound_sqlite_begin"
# Above this many tasks per statement the credential revocation of expire_tasks is split,
# keeping well under SQLite's bound-parameter limit.
_ID_CHUNK = 500

_ACTIVE = TaskState.ACTIVE.value
_AUDIT_INSERT = t.audit_events.insert().returning(
    t.audit_events.c.seq, sort_by_parameter_order=True
)

# pg_advisory_xact_lock key held by append_audit: the bytes of "tb:audit" as a bigint.
_POSTGRES_AUDIT_LOCK = 0x74623A6175646974


def configure_sqlite(engine: Engine, *, foreign_keys: bool = True) -> None:
    """Make ``engine`` (the sync engine, or an async engine's ``sync_engine``) use SQLite the
    way taskbound needs: WAL journal, a busy timeout, foreign keys on, and real transactions.

    The sqlite3 module's legacy transaction mode does not BEGIN before a SELECT or DDL, so
    reads would not be repeatable and DDL would autocommit; SQLAlchemy emits BEGIN instead
    (``BEGIN IMMEDIATE`` when a connection has asked for it, to queue on the write lock up
    front).
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))


def immediate_begin_option() -> dict[str, str]:
    """Execution options that make a SQLite connection configured by
    :func:`configure_sqlite` start its transactions with ``BEGIN IMMEDIATE``."""
    return {_BEGIN_OPTION: "BEGIN IMMEDIATE"}


def create_engine_for(target: DatabaseURL) -> AsyncEngine:
    """An async engine for ``target`` with taskbound's connection settings."""
    options: dict[str, Any] = {
        "hide_parameters": True,
        "json_serializer": codec.dump_json,
        "json_deserializer": codec.load_json,
    }
    if target.dialect == "postgresql":
        connect_args = {}
        if "connect_timeout" not in target.async_url.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        return create_async_engine(
            target.async_url, pool_pre_ping=True, connect_args=connect_args, **options
        )
    engine = create_async_engine(target.async_url, **options)
    configure_sqlite(engine.sync_engine)
    return engine


def storage_error(exc: BaseException, secrets: tuple[str, ...]) -> StorageError:
    """A :class:`StorageError` for a failing database, described without the SQL, its
    parameters or the password."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return StorageError(internal=redact(f"{type(orig).__name__}: {orig}", secrets))


_SQLITE_UNIQUE = frozenset({sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY})


def _integrity_error(exc: IntegrityError, secrets: tuple[str, ...]) -> TaskboundError:
    orig = exc.orig
    detail = redact(f"{type(orig).__name__}: {orig}", secrets)
    sqlstate = getattr(orig, "sqlstate", None)
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if sqlstate == "23505" or sqlite_code in _SQLITE_UNIQUE:
        return Conflict(internal=detail)
    if sqlstate == "23503" or sqlite_code == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
        return ReferenceError_(internal=detail)
    # NOT NULL or CHECK: the code built a row the schema refuses.
    return TaskboundError(internal=detail)


class SqlStorage:
    """A :class:`~taskbound.storage.base.Storage` in SQLite or PostgreSQL.

    The schema must exist (see :func:`taskbound.storage.migrate.migrate`);
    :func:`taskbound.storage.open_storage` migrates, then builds one of these. A lookup by a
    key holding a NUL character answers "not found" without a query: PostgreSQL refuses
    such a parameter, and no stored key can hold one.
    """

    def __init__(self, engine: AsyncEngine, *, secrets: tuple[str, ...] = ()) -> None:
        self._engine = engine
        self._secrets = secrets
        self._postgres = engine.dialect.name == "postgresql"

    @classmethod
    def from_url(cls, url: str) -> SqlStorage:
        """A storage on its own engine (and so its own connection pool) for ``url``."""
        target = parse_database_url(url)
        return cls(create_engine_for(target), secrets=target.secrets)

    async def check(self) -> None:
        """Raise :class:`StorageError` unless the database answers ``SELECT 1``."""
        async with self._transaction() as conn:
            await conn.execute(select(literal(1)))

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    @asynccontextmanager
    async def _transaction(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._engine.connect() as conn:
                if write and not self._postgres:
                    await conn.execution_options(**immediate_begin_option())
                async with conn.begin():
                    yield conn
        except IntegrityError as exc:
            raise _integrity_error(exc, self._secrets) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise storage_error(exc, self._secrets) from exc

    def _text_order(self, column: Column[Any]) -> ColumnElement[Any]:
        return column.collate("C") if self._postgres else column

    def _insert(self, table: Table) -> pg_dialect.Insert | sqlite_dialect.Insert:
        return pg_dialect.insert(table) if self._postgres else sqlite_dialect.insert(table)

    async def _execute_one(self, statement: Insert, row: dict[str, Any]) -> None:
        async with self._transaction(write=True) as conn:
            await conn.execute(statement.values(row))

    # --- registry --------------------------------------------------------------------------

    async def create_owner(self, owner: Owner) -> None:
        await self._execute_one(t.owners.insert(), codec.owner_row(owner))

    async def update_owner(self, owner: Owner) -> None:
        row = codec.owner_row(owner)
        del row["id"], row["created_at"]
        async with self._transaction(write=True) as conn:
            result = await conn.execute(
                update(t.owners).where(t.owners.c.id == owner.id).values(row)
            )
            changed = result.rowcount
            if changed == 1 and owner.disabled:
                await self._revoke_tasks(
                    conn,
                    t.tasks.c.owner_id == owner.id,
                    codec.OWNER_DISABLED_REASON,
                    codec.utc(owner.updated_at),
                )
        if changed != 1:
            raise NotFound(internal=f"owners: no row {owner.id!r}")

    async def get_owner(self, owner_id: str) -> Owner | None:
        if codec.has_nul(owner_id):
            return None
        async with self._transaction() as conn:
            row = (
                (await conn.execute(select(t.owners).where(t.owners.c.id == owner_id)))
                .mappings()
                .first()
            )
        return None if row is None else codec.owner_from(row)

    async def list_owners(self) -> list[Owner]:
        async with self._transaction() as conn:
            rows = (
                (await conn.execute(select(t.owners).order_by(self._text_order(t.owners.c.id))))
                .mappings()
                .all()
            )
        return [codec.owner_from(r) for r in rows]

    async def create_agent(self, agent: Agent) -> None:
        await self._execute_one(t.agents.insert(), codec.agent_row(agent))

    async def update_agent(self, agent: Agent) -> None:
        row = codec.agent_row(agent)
        del row["spiffe_id"], row["created_at"]
        async with self._transaction(write=True) as conn:
            result = await conn.execute(
                update(t.agents).where(t.agents.c.spiffe_id == agent.spiffe_id).values(row)
            )
            changed = result.rowcount
            if changed == 1 and agent.state is not AgentState.ACTIVE:
                await self._revoke_tasks(
                    conn,
                    t.tasks.c.agent_id == agent.spiffe_id,
                    codec.agent_state_reason(agent.state),
                    codec.utc(agent.updated_at),
                )
        if changed != 1:
            raise NotFound(internal=f"agents: no row {agent.spiffe_id!r}")

    async def get_agent(self, spiffe_id: str) -> Agent | None:
        if codec.has_nul(spiffe_id):
            return None
        async with self._transaction() as conn:
            row = (
                (await conn.execute(select(t.agents).where(t.agents.c.spiffe_id == spiffe_id)))
                .mappings()
                .first()
            )
        return None if row is None else codec.agent_from(row)

    async def list_agents(self, owner_id: str | None = None) -> list[Agent]:
        if codec.has_nul(owner_id):
            return []
        query = select(t.agents).order_by(self._text_order(t.agents.c.spiffe_id))
        if owner_id is not None:
            query = query.where(t.agents.c.owner_id == owner_id)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.agent_from(r) for r in rows]

    async def set_agent_state(
        self, spiffe_id: str, state: AgentState, now: datetime
    ) -> Agent | None:
        now = codec.utc(now)
        changes = {"state": AgentState(state).value, "updated_at": now}
        if codec.has_nul(spiffe_id):
            return None
        async with self._transaction(write=True) as conn:
            row = (
                (
                    await conn.execute(
                        update(t.agents)
                        .where(t.agents.c.spiffe_id == spiffe_id)
                        .values(changes)
                        .returning(*t.agents.c)
                    )
                )
                .mappings()
                .first()
            )
            if row is not None and AgentState(state) is not AgentState.ACTIVE:
                await self._revoke_tasks(
                    conn,
                    t.tasks.c.agent_id == spiffe_id,
                    codec.agent_state_reason(state),
                    now,
                )
        return None if row is None else codec.agent_from(row)

    async def create_tool(self, tool: Tool, secret_ciphertext: bytes | None) -> None:
        row = codec.tool_row(tool)
        row["secret_ciphertext"] = None if secret_ciphertext is None else bytes(secret_ciphertext)
        await self._execute_one(t.tools.insert(), row)

    async def update_tool(self, tool: Tool, secret_ciphertext: bytes | None) -> None:
        row = codec.tool_row(tool)
        del row["id"], row["created_at"]
        if secret_ciphertext is not None:
            row["secret_ciphertext"] = bytes(secret_ciphertext)
        async with self._transaction(write=True) as conn:
            result = await conn.execute(update(t.tools).where(t.tools.c.id == tool.id).values(row))
            changed = result.rowcount
        if changed != 1:
            raise NotFound(internal=f"tools: no row {tool.id!r}")

    async def get_tool(self, tool_id: str) -> Tool | None:
        if codec.has_nul(tool_id):
            return None
        async with self._transaction() as conn:
            row = (
                (await conn.execute(select(t.tools).where(t.tools.c.id == tool_id)))
                .mappings()
                .first()
            )
        return None if row is None else codec.tool_from(row)

    async def load_grant_inputs(
        self, spiffe_id: str, owner_id: str, tool_ids: Sequence[str]
    ) -> GrantInputs:
        ids = sorted({i for i in tool_ids if not codec.has_nul(i)})
        async with self._transaction() as conn:
            agent_row = owner_row = None
            if not codec.has_nul(spiffe_id):
                agent_row = (
                    (await conn.execute(select(t.agents).where(t.agents.c.spiffe_id == spiffe_id)))
                    .mappings()
                    .first()
                )
            if not codec.has_nul(owner_id):
                owner_row = (
                    (await conn.execute(select(t.owners).where(t.owners.c.id == owner_id)))
                    .mappings()
                    .first()
                )
            tool_rows = (
                (await conn.execute(select(t.tools).where(t.tools.c.id.in_(ids)))).mappings().all()
                if ids
                else []
            )
        tools = {tool.id: tool for tool in map(codec.tool_from, tool_rows)}
        return GrantInputs(
            None if agent_row is None else codec.agent_from(agent_row),
            None if owner_row is None else codec.owner_from(owner_row),
            tools,
        )

    async def list_tools(self) -> list[Tool]:
        async with self._transaction() as conn:
            rows = (
                (await conn.execute(select(t.tools).order_by(self._text_order(t.tools.c.id))))
                .mappings()
                .all()
            )
        return [codec.tool_from(r) for r in rows]

    async def get_tool_secret(self, tool_id: str) -> bytes | None:
        if codec.has_nul(tool_id):
            return None
        async with self._transaction() as conn:
            secret = await conn.scalar(
                select(t.tools.c.secret_ciphertext).where(t.tools.c.id == tool_id)
            )
        return None if secret is None else bytes(secret)

    # --- keys ------------------------------------------------------------------------------

    async def insert_active_key(self, key: SigningKey) -> SigningKey:
        row = codec.new_active_key_row(key)
        # The conflict target is the one-active-key-per-purpose constraint only: a clash on
        # the kid is a real Conflict, not a lost race.
        insert_unless_active = (
            self._insert(t.signing_keys)
            .values(row)
            .on_conflict_do_nothing(
                index_elements=[t.signing_keys.c.purpose, t.signing_keys.c.active_slot]
            )
        )
        active_key = select(t.signing_keys).where(
            t.signing_keys.c.purpose == row["purpose"],
            t.signing_keys.c.active_slot == codec.ACTIVE_SLOT,
        )
        async with self._transaction(write=True) as conn:
            await conn.execute(insert_unless_active)
            # Read-committed (PostgreSQL) gives this statement a fresh snapshot, so it sees
            # the key of whichever transaction won.
            active = (await conn.execute(active_key)).mappings().first()
        if active is None:
            raise TaskboundError(internal="signing_keys: no active key right after inserting one")
        return codec.key_from(active)

    async def rotate_key(self, new_key: SigningKey, retire_after: datetime) -> None:
        row = codec.new_active_key_row(new_key)
        retiring = {
            "state": KeyState.RETIRING.value,
            "retire_after": codec.utc(retire_after),
            "active_slot": None,
        }
        async with self._transaction(write=True) as conn:
            await conn.execute(
                update(t.signing_keys)
                .where(
                    t.signing_keys.c.purpose == row["purpose"],
                    t.signing_keys.c.active_slot == codec.ACTIVE_SLOT,
                )
                .values(retiring)
            )
            await conn.execute(t.signing_keys.insert().values(row))

    async def list_keys(self, purpose: KeyPurpose | None = None) -> list[SigningKey]:
        query = select(t.signing_keys).order_by(
            t.signing_keys.c.created_at.desc(),
            case((t.signing_keys.c.active_slot.is_(None), 1), else_=0),
            self._text_order(t.signing_keys.c.kid),
        )
        if purpose is not None:
            query = query.where(t.signing_keys.c.purpose == KeyPurpose(purpose).value)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.key_from(r) for r in rows]

    async def prune_keys(self, now: datetime) -> int:
        now = codec.utc(now)
        async with self._transaction(write=True) as conn:
            result = await conn.execute(
                t.signing_keys.delete().where(
                    t.signing_keys.c.state == KeyState.RETIRING.value,
                    t.signing_keys.c.retire_after <= now,
                )
            )
            changed = result.rowcount
        return changed

    # --- tasks -----------------------------------------------------------------------------

    async def create_task(self, task: Task, credentials: Sequence[CredentialRecord]) -> bool:
        row = codec.task_row(task)
        cred_rows = [codec.credential_row(c) for c in credentials]
        # The agent must be active and the owner enabled at the moment of insertion: FOR
        # SHARE (PostgreSQL) makes a concurrent suspension wait for this insert and then
        # revoke the new task too, or this insert see the suspension. SQLite's writers are
        # serialised by BEGIN IMMEDIATE.
        standing = (
            select(t.agents.c.state, t.owners.c.disabled)
            .select_from(t.agents.join(t.owners, t.owners.c.id == task.owner_id))
            .where(t.agents.c.spiffe_id == task.agent_id)
            .with_for_update(read=True)
        )
        async with self._transaction(write=True) as conn:
            found = (await conn.execute(standing)).first()
            if found is None:
                raise ReferenceError_(internal="tasks: unknown agent or owner")
            if found.state != AgentState.ACTIVE.value or found.disabled:
                return False
            await conn.execute(t.tasks.insert().values(row))
            if cred_rows:
                await conn.execute(t.credentials.insert(), cred_rows)
        return True

    async def get_task(self, task_id: str) -> Task | None:
        if codec.has_nul(task_id):
            return None
        async with self._transaction() as conn:
            row = await self._task_row(conn, task_id)
        return None if row is None else codec.task_from(row)

    async def list_tasks(self, flt: TaskFilter) -> list[Task]:
        if flt.limit < 0:
            raise ValueError("TaskFilter.limit must not be negative")
        if codec.has_nul(flt.agent_id, flt.owner_id):
            return []
        query = (
            select(t.tasks)
            .order_by(t.tasks.c.created_at.desc(), self._text_order(t.tasks.c.id))
            .limit(flt.limit)
        )
        if flt.agent_id is not None:
            query = query.where(t.tasks.c.agent_id == flt.agent_id)
        if flt.owner_id is not None:
            query = query.where(t.tasks.c.owner_id == flt.owner_id)
        if flt.state is not None:
            query = query.where(t.tasks.c.state == TaskState(flt.state).value)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.task_from(r) for r in rows]

    async def add_credential(self, credential: CredentialRecord, now: datetime) -> bool:
        row = codec.credential_row(credential)
        now = codec.utc(now)
        # One statement: the credential's values, selected from its task's row only while
        # that task is live. FOR SHARE (PostgreSQL; SQLite's writers are serialised anyway)
        # makes a concurrent end_task wait for this insert, or this insert see its result.
        from_live_task = (
            select(*(literal(row[c.name], c.type) for c in t.credentials.columns))
            .select_from(t.tasks)
            .where(
                t.tasks.c.id == credential.task_id,
                t.tasks.c.state == _ACTIVE,
                t.tasks.c.expires_at > now,
            )
            .with_for_update(read=True)
        )
        statement = (
            t.credentials.insert()
            .from_select([c.name for c in t.credentials.columns], from_live_task)
            # SQLAlchemy keeps the rowcount of UPDATE and DELETE only, unless asked.
            .execution_options(preserve_rowcount=True)
        )
        async with self._transaction(write=True) as conn:
            result = await conn.execute(statement)
            changed = result.rowcount
        return changed == 1

    async def get_credential(self, jti: str) -> CredentialRecord | None:
        if codec.has_nul(jti):
            return None
        async with self._transaction() as conn:
            row = (
                (await conn.execute(select(t.credentials).where(t.credentials.c.jti == jti)))
                .mappings()
                .first()
            )
        return None if row is None else codec.credential_from(row)

    async def list_credentials(self, task_id: str) -> list[CredentialRecord]:
        if codec.has_nul(task_id):
            return []
        query = (
            select(t.credentials)
            .where(t.credentials.c.task_id == task_id)
            .order_by(t.credentials.c.issued_at, self._text_order(t.credentials.c.jti))
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.credential_from(r) for r in rows]

    async def end_task(
        self, task_id: str, state: TaskState, reason: str, now: datetime
    ) -> tuple[Task, bool] | None:
        state = TaskState(state)
        if state is TaskState.ACTIVE:
            raise ValueError("end_task needs a final state, not ACTIVE")
        codec.check_text(reason=reason)
        now = codec.utc(now)
        if codec.has_nul(task_id):
            return None
        # The task row is updated first: its row lock orders this against add_credential,
        # and against another end_task, which then finds the task no longer active.
        end = (
            update(t.tasks)
            .where(t.tasks.c.id == task_id, t.tasks.c.state == _ACTIVE)
            .values(state=state.value, ended_at=now, end_reason=reason)
            .returning(*t.tasks.c)
        )
        async with self._transaction(write=True) as conn:
            ended = (await conn.execute(end)).mappings().first()
            if ended is not None:
                await self._revoke_credentials_of(conn, [task_id], reason, now)
                return codec.task_from(ended), True
            row = await self._task_row(conn, task_id)
        return None if row is None else (codec.task_from(row), False)

    async def revoke_credential(self, jti: str, reason: str, now: datetime) -> bool:
        codec.check_text(reason=reason)
        now = codec.utc(now)
        if codec.has_nul(jti):
            return False
        async with self._transaction(write=True) as conn:
            result = await conn.execute(
                update(t.credentials)
                .where(
                    t.credentials.c.jti == jti,
                    t.credentials.c.revoked_at.is_(None),
                    t.credentials.c.expires_at > now,
                )
                .values(revoked_at=now, revoke_reason=reason)
            )
            changed = result.rowcount
        return changed == 1

    async def expire_tasks(self, now: datetime) -> list[str]:
        now = codec.utc(now)
        expire = (
            update(t.tasks)
            .where(t.tasks.c.state == _ACTIVE, t.tasks.c.expires_at <= now)
            .values(state=TaskState.EXPIRED.value, ended_at=now, end_reason=codec.EXPIRED_REASON)
            .returning(t.tasks.c.id)
        )
        async with self._transaction(write=True) as conn:
            expired = list((await conn.execute(expire)).scalars().all())
            await self._revoke_credentials_of(conn, expired, codec.EXPIRED_REASON, now)
        return sorted(expired)

    async def _revoke_tasks(
        self, conn: AsyncConnection, which: ColumnElement[bool], reason: str, now: datetime
    ) -> None:
        """End every ACTIVE task matching ``which`` as REVOKED, with its credentials."""
        ended = (
            update(t.tasks)
            .where(t.tasks.c.state == _ACTIVE, which)
            .values(state=TaskState.REVOKED.value, ended_at=now, end_reason=reason)
            .returning(t.tasks.c.id)
        )
        ids = list((await conn.execute(ended)).scalars().all())
        await self._revoke_credentials_of(conn, ids, reason, now)

    async def _revoke_credentials_of(
        self, conn: AsyncConnection, task_ids: Sequence[str], reason: str, now: datetime
    ) -> None:
        for start in range(0, len(task_ids), _ID_CHUNK):
            chunk = task_ids[start : start + _ID_CHUNK]
            await conn.execute(
                update(t.credentials)
                .where(t.credentials.c.task_id.in_(chunk), t.credentials.c.revoked_at.is_(None))
                .values(revoked_at=now, revoke_reason=reason)
            )

    @staticmethod
    async def _task_row(conn: AsyncConnection, task_id: str) -> Any:
        return (
            (await conn.execute(select(t.tasks).where(t.tasks.c.id == task_id))).mappings().first()
        )

    # --- admin tokens ----------------------------------------------------------------------

    async def add_admin_token(self, token: AdminToken) -> None:
        await self._execute_one(t.admin_tokens.insert(), codec.admin_token_row(token))

    async def find_admin_token(self, token_hash: str) -> AdminToken | None:
        if codec.has_nul(token_hash):
            return None
        async with self._transaction() as conn:
            row = (
                (
                    await conn.execute(
                        select(t.admin_tokens).where(t.admin_tokens.c.token_hash == token_hash)
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else codec.admin_token_from(row)

    async def list_admin_tokens(self) -> list[AdminToken]:
        query = select(t.admin_tokens).order_by(
            t.admin_tokens.c.created_at, self._text_order(t.admin_tokens.c.id)
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.admin_token_from(r) for r in rows]

    # --- audit log -------------------------------------------------------------------------

    async def append_audit(self, event: AuditEvent) -> int:
        (seq,) = await self.append_audits([event])
        return seq

    async def append_audits(self, events: Sequence[AuditEvent]) -> list[int]:
        rows = [codec.audit_row(e) for e in events]
        if not rows:
            return []
        async with self._transaction(write=True) as conn:
            if self._postgres:
                # Held to the commit: the next append takes its number only after this one
                # is visible. (SQLite's BEGIN IMMEDIATE already orders writers.)
                await conn.execute(
                    select(func.pg_advisory_xact_lock(literal(_POSTGRES_AUDIT_LOCK, BigInteger)))
                )
            # One multi-row INSERT ... RETURNING ("insertmanyvalues"); the returned numbers
            # come back in the order of the given rows.
            result = await conn.execute(_AUDIT_INSERT, rows)
            seqs = [int(seq) for seq in result.scalars().all()]
        if len(seqs) != len(rows):
            raise TaskboundError(internal="audit_events: insert returned no sequence")
        return seqs

    async def list_audit(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        task: str | None = None,
        agent: str | None = None,
    ) -> list[tuple[int, AuditEvent]]:
        codec.check_audit_query(after, limit)
        if codec.has_nul(task, agent):
            return []
        c = t.audit_events.c
        query = select(t.audit_events).where(c.seq > after).order_by(c.seq).limit(limit)
        if task is not None:
            query = query.where(c.task == task)
        if agent is not None:
            query = query.where(c.agent == agent)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.audit_from(r) for r in rows]
