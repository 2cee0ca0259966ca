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
``list_audit(after=n)`` never misses a record that commits late with a lower number. The
revocation log is numbered the same way under its own lock, and every transaction that
writes to it sends ``NOTIFY taskbound_revocations`` on PostgreSQL (delivered at commit, and
only if it commits).

Errors: a unique violation is :class:`~taskbound.errors.Conflict`, a foreign-key violation
:class:`~taskbound.errors.ReferenceError_`, and a lost or failing database
:class:`~taskbound.errors.StorageError`, whose text never contains the URL's password and
whose chained exception never contains statement parameters (``hide_parameters``).

Orderings are those of :mod:`taskbound.storage` (the in-memory twin sorts the same way);
text is compared by code point (``COLLATE "C"`` on PostgreSQL, SQLite's default ``BINARY``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Engine,
    Insert,
    Table,
    case,
    create_engine,
    delete,
    event,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Select

from taskbound.core import audit, breakglass
from taskbound.core.approvals import cast_vote, due_to_expire
from taskbound.core.audit import ChainRecord, Checkpoint
from taskbound.core.breakglass import BreakGlass
from taskbound.core.model import (
    AdminToken,
    Agent,
    AgentState,
    Approval,
    ApprovalState,
    ApprovalVote,
    AuditEvent,
    CredentialRecord,
    KeyPurpose,
    KeyState,
    Owner,
    Revocation,
    SigningKey,
    Task,
    TaskFilter,
    TaskState,
    Tool,
    UiSession,
)
from taskbound.core.usage import GATEWAY_CALL, TimelineRow, UsageRow
from taskbound.errors import (
    BREAKGLASS_ERRORS,
    ApprovalExpired,
    Conflict,
    NotFound,
    ReferenceError_,
    StorageError,
    TaskboundError,
)
from taskbound.storage import codec
from taskbound.storage import schema as t
from taskbound.storage.base import GrantInputs
from taskbound.storage.pending import Pending, claim
from taskbound.storage.urls import DatabaseURL, parse_database_url, redact

SQLITE_BUSY_TIMEOUT_MS = 5_000
# How long a PostgreSQL audit append waits for the chain's lock before it fails.
AUDIT_LOCK_TIMEOUT_MS = 5_000
POSTGRES_CONNECT_TIMEOUT_S = 10

_BEGIN_OPTION = "taskbound_sqlite_begin"
# Above this many tasks per statement the credential revocation of expire_tasks (and the
# bulk read task_agents) is split, keeping well under SQLite's bound-parameter limit.
_ID_CHUNK = 500

_ACTIVE = TaskState.ACTIVE.value
_PENDING = ApprovalState.PENDING.value
_APPROVED = ApprovalState.APPROVED.value
_AUDIT_INSERT = t.audit_events.insert()
# The head of the chain: the last record (the primary key index, read backwards).
_AUDIT_HEAD = (
    select(t.audit_events.c.seq, t.audit_events.c.hash)
    .order_by(t.audit_events.c.seq.desc())
    .limit(1)
)

# pg_advisory_xact_lock key held by append_audit: the bytes of "tb:audit" as a bigint.
_POSTGRES_AUDIT_LOCK = 0x74623A6175646974
# ... and by every writer of the revocation log: the bytes of "tb:revok".
_POSTGRES_REVOCATION_LOCK = 0x74623A7265766F6B
# The channel gateways LISTEN on; the payload is the highest new sequence number.
REVOCATION_CHANNEL = "taskbound_revocations"
_REVOCATION_INSERT = t.revocations.insert().returning(
    t.revocations.c.seq, sort_by_parameter_order=True
)


class _Abandon(Exception):
    """Raised inside a transaction to roll it back when a later step finds nothing to do."""


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


def create_engine_for(target: DatabaseURL, **extra: Any) -> AsyncEngine:
    """An async engine for ``target`` with taskbound's connection settings (``extra``:
    more engine options, e.g. a ``poolclass``)."""
    options: dict[str, Any] = {
        **extra,
        "hide_parameters": True,
        "json_serializer": codec.dump_json,
        "json_deserializer": codec.load_json,
    }
    if target.dialect == "postgresql":
        connect_args = dict(options.pop("connect_args", {}))
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


def _head(row: Any) -> tuple[int, str]:
    """(seq, hash) of the chain's head row, or the start of an empty chain."""
    return (0, audit.GENESIS) if row is None else (int(row[0]), str(row[1]))


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
        # SQLite file databases: audit appends (the one write on every gateway call) run on
        # a plain synchronous engine in one dedicated thread, a single hop per batch instead
        # of one per statement through the async driver.
        database = engine.url.database or ""
        self._audit_fast = (
            not self._postgres
            and database not in ("", ":memory:")
            and "memory" not in str(engine.url.query.get("mode", ""))
        )
        self._audit_engine: Engine | None = None
        self._audit_thread: ThreadPoolExecutor | None = None

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
        if self._audit_thread is not None:
            engine, pool = self._audit_engine, self._audit_thread
            self._audit_engine = self._audit_thread = None
            if engine is not None:
                await asyncio.get_running_loop().run_in_executor(pool, engine.dispose)
            pool.shutdown(wait=False)
        await self._engine.dispose()

    @asynccontextmanager
    async def _transaction(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        """One transaction. A write transaction also appends, before it commits, the audit
        records of the change it makes (:mod:`taskbound.storage.pending`)."""
        waiting: Pending | None = None
        try:
            async with self._engine.connect() as conn:
                if write and not self._postgres:
                    await conn.execution_options(**immediate_begin_option())
                async with conn.begin():
                    yield conn
                    waiting = claim() if write else None
                    if waiting is not None:
                        await self._chain_in(conn, [codec.audit_row(e) for e in waiting.events])
            if waiting is not None:
                waiting.committed = True
        except IntegrityError as exc:
            raise _integrity_error(exc, self._secrets) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise storage_error(exc, self._secrets) from exc
        finally:
            if waiting is not None and not waiting.committed:
                waiting.claimed = False

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

    async def update_owner(
        self, owner: Owner, *, cause: str = "system", reason: str | None = None
    ) -> None:
        codec.check_text(cause=cause, reason=reason)
        row = codec.owner_row(owner)
        del row["id"], row["created_at"]
        now = codec.utc(owner.updated_at)
        async with self._transaction(write=True) as conn:
            was = await conn.scalar(
                select(t.owners.c.disabled).where(t.owners.c.id == owner.id).with_for_update()
            )
            if was is None:
                raise NotFound(internal=f"owners: no row {owner.id!r}")
            await conn.execute(update(t.owners).where(t.owners.c.id == owner.id).values(row))
            log: list[Revocation] = []
            if bool(was) != owner.disabled:
                log.append(codec.owner_entry(owner, now, cause, reason))
            if owner.disabled:
                why = reason or codec.OWNER_DISABLED_REASON
                log += await self._revoke_tasks(
                    conn, t.tasks.c.owner_id == owner.id, why, now, cause
                )
                # Credentials delegated to the owner's agents within other tasks, and theirs.
                c = t.credentials.c
                theirs = select(t.agents.c.spiffe_id).where(t.agents.c.owner_id == owner.id)
                held = c.agent_id.in_(theirs) & (c.expires_at > now)
                revoked = await self._revoke_tree(conn, held, why, now)
                log += [codec.credential_entry(r, now, cause, why) for r in revoked]
            await self._log(conn, log)

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

    async def update_agent(
        self, agent: Agent, *, cause: str = "system", reason: str | None = None
    ) -> None:
        codec.check_text(cause=cause, reason=reason)
        row = codec.agent_row(agent)
        del row["spiffe_id"], row["created_at"]
        async with self._transaction(write=True) as conn:
            changed = await self._change_agent(
                conn, agent.spiffe_id, row, AgentState(agent.state), cause, reason
            )
        if changed is None:
            raise NotFound(internal=f"agents: no row {agent.spiffe_id!r}")

    async def _change_agent(
        self,
        conn: AsyncConnection,
        spiffe_id: str,
        changes: dict[str, Any],
        state: AgentState,
        cause: str,
        reason: str | None,
    ) -> Any:
        """Update an agent's row; log and apply a change of state. Returns the new row, or
        None when there is no such agent. Retired is final (Conflict)."""
        was = await conn.scalar(
            select(t.agents.c.state).where(t.agents.c.spiffe_id == spiffe_id).with_for_update()
        )
        if was is None:
            return None
        if was == AgentState.RETIRED.value and state is not AgentState.RETIRED:
            raise Conflict(codec.RETIRED_IS_FINAL)
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
        now = codec.utc(changes["updated_at"])
        log: list[Revocation] = []
        if was != state.value:
            log.append(codec.agent_entry(spiffe_id, state, now, cause, reason))
        if state is not AgentState.ACTIVE:
            why = reason or codec.agent_state_reason(state)
            log += await self._revoke_tasks(conn, t.tasks.c.agent_id == spiffe_id, why, now, cause)
            # Credentials delegated to the agent within other agents' tasks, and theirs.
            c = t.credentials.c
            held = (c.agent_id == spiffe_id) & (c.expires_at > now)
            revoked = await self._revoke_tree(conn, held, why, now)
            log += [codec.credential_entry(r, now, cause, why) for r in revoked]
        await self._log(conn, log)
        return row

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
        self,
        spiffe_id: str,
        state: AgentState,
        now: datetime,
        *,
        cause: str = "system",
        reason: str | None = None,
    ) -> Agent | None:
        codec.check_text(cause=cause, reason=reason)
        now = codec.utc(now)
        state = AgentState(state)
        changes = {"state": state.value, "updated_at": now}
        if codec.has_nul(spiffe_id):
            return None
        async with self._transaction(write=True) as conn:
            row = await self._change_agent(conn, spiffe_id, changes, state, cause, reason)
        return None if row is None else codec.agent_from(row)

    async def change_agent_state(
        self,
        spiffe_id: str,
        state: AgentState,
        now: datetime,
        *,
        cause: str = "system",
        reason: str | None = None,
    ) -> tuple[Agent, bool] | None:
        codec.check_text(cause=cause, reason=reason)
        now = codec.utc(now)
        state = AgentState(state)
        if codec.has_nul(spiffe_id):
            return None
        async with self._transaction(write=True) as conn:
            was = await conn.scalar(
                select(t.agents.c.state).where(t.agents.c.spiffe_id == spiffe_id).with_for_update()
            )
            if was is None:
                return None
            if was == state.value:
                row = (
                    (await conn.execute(select(t.agents).where(t.agents.c.spiffe_id == spiffe_id)))
                    .mappings()
                    .first()
                )
                assert row is not None
                return codec.agent_from(row), False
            changes = {"state": state.value, "updated_at": now}
            row = await self._change_agent(conn, spiffe_id, changes, state, cause, reason)
        return codec.agent_from(row), True

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

    async def withdraw_key(
        self,
        kid: str,
        now: datetime,
        replacement: SigningKey | None,
        *,
        cause: str = "system",
        reason: str = "signing key withdrawn",
    ) -> int | None:
        codec.check_text(kid=kid, cause=cause, reason=reason)
        now = codec.utc(now)
        keys = t.signing_keys.c
        async with self._transaction(write=True) as conn:
            found = (
                await conn.execute(
                    select(keys.purpose, keys.active_slot).where(keys.kid == kid).with_for_update()
                )
            ).first()
            if found is None:
                return None
            active = found.active_slot == codec.ACTIVE_SLOT
            if active and replacement is None:
                raise ValueError("withdrawing the active key needs a replacement")
            if replacement is not None and replacement.kid == kid:
                raise Conflict(internal="signing_keys: a withdrawn key cannot replace itself")
            await conn.execute(t.signing_keys.delete().where(keys.kid == kid))
            if active and replacement is not None:
                if replacement.purpose.value != found.purpose:
                    raise ValueError("the replacement key must have the withdrawn key's purpose")
                await conn.execute(
                    t.signing_keys.insert().values(codec.new_active_key_row(replacement))
                )
            revoked = await self._revoke_tree(
                conn,
                (t.credentials.c.kid == kid) & (t.credentials.c.expires_at > now),
                reason,
                now,
            )
            log = [codec.key_entry(kid, now, cause, reason)]
            log += [codec.credential_entry(r, now, cause, reason) for r in revoked]
            await self._log(conn, log)
        return len(revoked)

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
        try:
            async with self._transaction(write=True) as conn:
                found = (await conn.execute(standing)).first()
                if found is None:
                    raise ReferenceError_(internal="tasks: unknown agent or owner")
                if found.state != AgentState.ACTIVE.value or found.disabled:
                    # Rolled back: nothing was written, and no waiting record may commit.
                    raise _Abandon
                await self._require_exceptions(conn, credentials, task.created_at)
                await conn.execute(t.tasks.insert().values(row))
                if cred_rows:
                    await conn.execute(t.credentials.insert(), cred_rows)
        except _Abandon:
            return False
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
        if flt.created_since is not None:
            query = query.where(t.tasks.c.created_at >= codec.utc(flt.created_since))
        if flt.created_until is not None:
            query = query.where(t.tasks.c.created_at < codec.utc(flt.created_until))
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.task_from(r) for r in rows]

    async def task_agents(self, task_ids: Sequence[str]) -> dict[str, str]:
        ids = list(dict.fromkeys(i for i in task_ids if not codec.has_nul(i)))
        out: dict[str, str] = {}
        if not ids:
            return out
        c = t.tasks.c
        async with self._transaction() as conn:
            # Chunked: one IN list per statement stays under SQLite's parameter limit.
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                query = select(c.id, c.agent_id).where(c.id.in_(chunk))
                out.update((str(i), str(a)) for i, a in (await conn.execute(query)).all())
        return out

    @staticmethod
    def _insert_while_task_live(credential: CredentialRecord, now: datetime) -> Insert:
        """One statement: the credential's values, selected from its task's row only while
        that task is live. FOR SHARE (PostgreSQL; SQLite's writers are serialised anyway)
        makes a concurrent end_task wait for this insert, or this insert see its result."""
        row = codec.credential_row(credential)
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
        return (
            t.credentials.insert()
            .from_select([c.name for c in t.credentials.columns], from_live_task)
            # SQLAlchemy keeps the rowcount of UPDATE and DELETE only, unless asked.
            .execution_options(preserve_rowcount=True)
        )

    @staticmethod
    async def _exceptions_hold(
        conn: AsyncConnection, credentials: Sequence[CredentialRecord], now: datetime
    ) -> bool:
        """Whether every break-glass exception these credentials rely on is in force at
        ``now``. FOR SHARE (PostgreSQL; SQLite's writers are serialised) makes a concurrent
        early end wait for this insert and then revoke the new credentials too, or this
        insert see the end."""
        wanted = sorted({c.exception_id for c in credentials if c.exception_id is not None})
        if not wanted:
            return True
        b = t.breakglass.c
        query = (
            select(b.id)
            .where(
                b.id.in_(wanted),
                b.created_at <= now,
                b.expires_at > now,
                b.ended_at.is_(None),
            )
            .with_for_update(read=True)
        )
        held = set((await conn.execute(query)).scalars())
        return held == set(wanted)

    async def _require_exceptions(
        self, conn: AsyncConnection, credentials: Sequence[CredentialRecord], now: datetime
    ) -> None:
        if not await self._exceptions_hold(conn, credentials, now):
            raise BREAKGLASS_ERRORS["already_ended"](
                "the break-glass exception ended while the grant was decided"
            )

    async def add_credential(self, credential: CredentialRecord, now: datetime) -> bool:
        statement = self._insert_while_task_live(credential, codec.utc(now))
        try:
            async with self._transaction(write=True) as conn:
                await self._require_exceptions(conn, [credential], codec.utc(now))
                if (await conn.execute(statement)).rowcount != 1:
                    raise _Abandon  # the task is not live: nothing written, nothing recorded
        except _Abandon:
            return False
        return True

    async def add_derived_credential(
        self, credential: CredentialRecord, now: datetime, *, single_use: bool
    ) -> bool:
        parent = credential.parent_jti
        if parent is None:
            raise ValueError("a derived credential needs a parent_jti")
        now = codec.utc(now)
        insert = self._insert_while_task_live(credential, now)
        if codec.has_nul(parent):
            return False
        c = t.credentials.c
        # Re-checked on the locked row by PostgreSQL after any wait, so of two concurrent
        # single-use exchanges exactly one counts; a concurrent revocation of the parent
        # either waits for this transaction (and then sees the child) or wins (and then
        # this finds the parent revoked).
        count = (
            update(t.credentials)
            .where(c.jti == parent, c.revoked_at.is_(None), c.expires_at > now)
            .values(exchange_count=c.exchange_count + 1)
            .returning(c.jti)
        )
        if single_use:
            count = count.where(c.exchange_count == 0)
        # The delegate must be active and its owner enabled at the moment of insertion: FOR
        # SHARE makes a concurrent suspension wait for this insert (and then revoke the new
        # credential too), or this insert see the suspension.
        standing = (
            select(t.agents.c.state, t.owners.c.disabled)
            .select_from(t.agents.join(t.owners, t.owners.c.id == t.agents.c.owner_id))
            .where(t.agents.c.spiffe_id == credential.agent_id)
            .with_for_update(read=True)
        )
        try:
            async with self._transaction(write=True) as conn:
                found = (await conn.execute(standing)).first()
                if found is None or found.state != AgentState.ACTIVE.value or found.disabled:
                    return False
                if not await self._exceptions_hold(conn, [credential], now):
                    return False
                if (await conn.execute(count)).first() is None:
                    return False
                if (await conn.execute(insert)).rowcount != 1:
                    raise _Abandon
        except _Abandon:
            return False
        return True

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
        self, task_id: str, state: TaskState, reason: str, now: datetime, *, cause: str = "agent"
    ) -> tuple[Task, bool] | None:
        state = TaskState(state)
        if state is TaskState.ACTIVE:
            raise ValueError("end_task needs a final state, not ACTIVE")
        codec.check_text(reason=reason, cause=cause)
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
                task = codec.task_from(ended)
                log = [
                    codec.task_entry(task.id, task.agent_id, task.expires_at, now, cause, reason)
                ]
                log += await self._revoke_credentials_of(conn, [task_id], reason, now, cause)
                await self._log(conn, log)
                return task, True
            row = await self._task_row(conn, task_id)
        return None if row is None else (codec.task_from(row), False)

    async def revoke_credential(
        self, jti: str, reason: str, now: datetime, *, cause: str = "system"
    ) -> bool:
        codec.check_text(reason=reason, cause=cause)
        now = codec.utc(now)
        if codec.has_nul(jti):
            return False
        c = t.credentials.c
        async with self._transaction(write=True) as conn:
            found = await conn.scalar(
                select(c.jti)
                .where(c.jti == jti, c.revoked_at.is_(None), c.expires_at > now)
                .with_for_update()
            )
            if found is None:
                return False
            revoked = await self._revoke_tree(conn, c.jti == jti, reason, now)
            await self._log(conn, [codec.credential_entry(r, now, cause, reason) for r in revoked])
        return True

    async def expire_tasks(self, now: datetime) -> list[str]:
        now = codec.utc(now)
        expire = (
            update(t.tasks)
            .where(t.tasks.c.state == _ACTIVE, t.tasks.c.expires_at <= now)
            .values(state=TaskState.EXPIRED.value, ended_at=now, end_reason=codec.EXPIRED_REASON)
            .returning(t.tasks.c.id, t.tasks.c.agent_id, t.tasks.c.expires_at)
        )
        async with self._transaction(write=True) as conn:
            rows = (await conn.execute(expire)).all()
            expired = [r.id for r in rows]
            log = [
                codec.task_entry(
                    r.id, r.agent_id, r.expires_at, now, "expiry", codec.EXPIRED_REASON
                )
                for r in rows
            ]
            log += await self._revoke_credentials_of(
                conn, expired, codec.EXPIRED_REASON, now, "expiry"
            )
            await self._log(conn, log)
        return sorted(expired)

    async def _revoke_tasks(
        self,
        conn: AsyncConnection,
        which: ColumnElement[bool],
        reason: str,
        now: datetime,
        cause: str,
    ) -> list[Revocation]:
        """End every ACTIVE task matching ``which`` as REVOKED, with its credentials; the
        log entries that say so."""
        ended = (
            update(t.tasks)
            .where(t.tasks.c.state == _ACTIVE, which)
            .values(state=TaskState.REVOKED.value, ended_at=now, end_reason=reason)
            .returning(t.tasks.c.id, t.tasks.c.agent_id, t.tasks.c.expires_at)
        )
        rows = (await conn.execute(ended)).all()
        log = [codec.task_entry(r.id, r.agent_id, r.expires_at, now, cause, reason) for r in rows]
        log += await self._revoke_credentials_of(conn, [r.id for r in rows], reason, now, cause)
        return log

    async def _revoke_credentials_of(
        self,
        conn: AsyncConnection,
        task_ids: Sequence[str],
        reason: str,
        now: datetime,
        cause: str,
    ) -> list[Revocation]:
        """Revoke the credentials of these (ended) tasks and everything derived from them.
        Their own task's entry covers the first; derived credentials of other tasks get an
        entry each."""
        ended = set(task_ids)
        log: list[Revocation] = []
        for start in range(0, len(task_ids), _ID_CHUNK):
            chunk = task_ids[start : start + _ID_CHUNK]
            revoked = await self._revoke_tree(conn, t.credentials.c.task_id.in_(chunk), reason, now)
            log += [
                codec.credential_entry(r, now, cause, reason)
                for r in revoked
                if r.task_id not in ended
            ]
        return log

    async def _revoke_tree(
        self, conn: AsyncConnection, roots: ColumnElement[bool], reason: str, now: datetime
    ) -> list[Any]:
        """Revoke the credentials matching ``roots`` and all their descendants (parent_jti,
        to any depth) that are not revoked yet. Returns (jti, task_id, agent_id, expires_at)
        rows of those revoked now."""
        c = t.credentials.c
        start: Select[Any] = select(c.jti).where(roots)
        tree = start.cte("revocation_tree", recursive=True)
        child = t.credentials.alias("child")
        tree = tree.union(
            select(child.c.jti).select_from(child.join(tree, child.c.parent_jti == tree.c.jti))
        )
        statement = (
            update(t.credentials)
            .where(c.jti.in_(select(tree.c.jti)), c.revoked_at.is_(None))
            .values(revoked_at=now, revoke_reason=reason)
            .returning(c.jti, c.task_id, c.agent_id, c.expires_at)
        )
        return list((await conn.execute(statement)).all())

    async def _log(self, conn: AsyncConnection, entries: Sequence[Revocation]) -> None:
        """Append ``entries`` to the revocation log inside the caller's transaction, in
        commit order, and tell the listening gateways (PostgreSQL) when it commits."""
        if not entries:
            return
        if self._postgres:
            await conn.execute(
                select(func.pg_advisory_xact_lock(literal(_POSTGRES_REVOCATION_LOCK, BigInteger)))
            )
        result = await conn.execute(_REVOCATION_INSERT, [codec.revocation_row(e) for e in entries])
        last = max(int(seq) for seq in result.scalars().all())
        if self._postgres:
            await conn.execute(select(func.pg_notify(REVOCATION_CHANNEL, str(last))))

    # --- revocation log --------------------------------------------------------------------

    async def list_revocations(
        self, *, after: int = 0, limit: int = 1000, live_at: datetime | None = None
    ) -> list[Revocation]:
        codec.check_revocation_query(after, limit)
        c = t.revocations.c
        query = select(t.revocations).where(c.seq > after).order_by(c.seq).limit(limit)
        if live_at is not None:
            query = query.where((c.expires_at.is_(None)) | (c.expires_at > codec.utc(live_at)))
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.revocation_from(r) for r in rows]

    async def last_revocation_seq(self) -> int:
        async with self._transaction() as conn:
            last = await conn.scalar(select(func.max(t.revocations.c.seq)))
        return int(last or 0)

    async def prune_revocations(self, now: datetime) -> int:
        now = codec.utc(now)
        async with self._transaction(write=True) as conn:
            result = await conn.execute(
                t.revocations.delete().where(t.revocations.c.expires_at <= now)
            )
            changed = result.rowcount
        return int(changed)

    async def get_signal_cursor(self, receiver: str) -> int | None:
        if codec.has_nul(receiver):
            return None
        async with self._transaction() as conn:
            seq = await conn.scalar(
                select(t.signal_cursors.c.seq).where(t.signal_cursors.c.receiver == receiver)
            )
        return None if seq is None else int(seq)

    async def set_signal_cursor(
        self, receiver: str, seq: int, now: datetime, *, expected: int | None
    ) -> bool:
        codec.check_text(receiver=receiver)
        now = codec.utc(now)
        c = t.signal_cursors.c
        async with self._transaction(write=True) as conn:
            statement: Any
            if expected is None:
                statement = (
                    self._insert(t.signal_cursors)
                    .values(receiver=receiver, seq=seq, updated_at=now)
                    .on_conflict_do_nothing(index_elements=[c.receiver])
                )
            else:
                statement = (
                    update(t.signal_cursors)
                    .where(c.receiver == receiver, c.seq == expected)
                    .values(seq=seq, updated_at=now)
                )
            result = await conn.execute(statement.execution_options(preserve_rowcount=True))
            changed = result.rowcount
        return changed == 1

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
        if self._audit_fast:
            if self._audit_thread is None:
                self._audit_thread = ThreadPoolExecutor(1, thread_name_prefix="taskbound-audit")
            seqs = await asyncio.get_running_loop().run_in_executor(
                self._audit_thread, self._append_audits_sync, rows
            )
            if len(seqs) != len(rows):
                raise TaskboundError(internal="audit_events: insert returned no sequence")
            return seqs
        async with self._transaction(write=True) as conn:
            chained = await self._chain_in(conn, rows)
        return [int(r["seq"]) for r in chained]

    async def _chain_in(
        self, conn: AsyncConnection, rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Number ``rows`` after the head, link them, insert them, in ``conn``'s transaction."""
        if self._postgres:
            # Held to the commit: the next append reads the head only after this one is
            # visible, so every replica extends ONE chain. (SQLite's BEGIN IMMEDIATE already
            # orders writers.) A writer that cannot get it in time fails, and so does the
            # request it records, rather than hanging behind a stuck transaction.
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {AUDIT_LOCK_TIMEOUT_MS:d}")
            await conn.execute(
                select(func.pg_advisory_xact_lock(literal(_POSTGRES_AUDIT_LOCK, BigInteger)))
            )
        head = (await conn.execute(_AUDIT_HEAD)).first()
        chained = codec.chain_rows(rows, *_head(head))
        await conn.execute(_AUDIT_INSERT, chained)
        return chained

    def _append_audits_sync(self, rows: list[dict[str, Any]]) -> list[int]:
        """The SQLite append, in the audit thread: one BEGIN IMMEDIATE transaction (writers
        queue on the database lock, so numbers are handed out in commit order)."""
        try:
            if self._audit_engine is None:
                self._audit_engine = create_engine(
                    self._engine.url.set(drivername="sqlite"),
                    hide_parameters=True,
                    json_serializer=codec.dump_json,
                    json_deserializer=codec.load_json,
                )
                configure_sqlite(self._audit_engine)
            with self._audit_engine.connect() as conn:
                conn = conn.execution_options(**immediate_begin_option())
                with conn.begin():
                    head = conn.execute(_AUDIT_HEAD).first()
                    chained = codec.chain_rows(rows, *_head(head))
                    conn.execute(_AUDIT_INSERT, chained)
                    return [int(r["seq"]) for r in chained]
        except IntegrityError as exc:
            raise _integrity_error(exc, self._secrets) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise storage_error(exc, self._secrets) from exc

    async def audit_head(self) -> tuple[int, str]:
        async with self._transaction() as conn:
            return _head((await conn.execute(_AUDIT_HEAD)).first())

    async def list_chain(self, *, after: int = 0, limit: int = 1000) -> list[ChainRecord]:
        codec.check_audit_query(after, limit)
        c = t.audit_events.c
        query = select(t.audit_events).where(c.seq > after).order_by(c.seq).limit(limit)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.chain_record_from(r) for r in rows]

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        await self._execute_one(t.audit_checkpoints.insert(), codec.checkpoint_row(checkpoint))

    async def list_checkpoints(self, *, after: int = -1, limit: int = 1000) -> list[Checkpoint]:
        k = t.audit_checkpoints.c
        query = select(t.audit_checkpoints).where(k.seq > after).order_by(k.seq).limit(limit)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.checkpoint_from(r) for r in rows]

    async def delete_audit_through(self, seq: int) -> int:
        c = t.audit_events.c
        async with self._transaction(write=True) as conn:
            if self._postgres:
                await conn.execute(
                    select(func.pg_advisory_xact_lock(literal(_POSTGRES_AUDIT_LOCK, BigInteger)))
                )
            head, _ = _head((await conn.execute(_AUDIT_HEAD)).first())
            if seq >= head:
                raise ValueError("the head of the chain is never archived away")
            pinned = await conn.scalar(
                select(t.audit_checkpoints.c.seq).where(t.audit_checkpoints.c.seq == seq)
            )
            if pinned is None:
                raise ValueError(f"no checkpoint pins record {seq}: take one first")
            deleted = await conn.execute(
                delete(t.audit_events).where(c.seq <= seq).execution_options(preserve_rowcount=True)
            )
            return int(deleted.rowcount)

    async def list_audit(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        task: str | None = None,
        agent: str | None = None,
        owner: str | None = None,
        decision: str | None = None,
        exception: str | None = None,
        tool: str | None = None,
        txn: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        descending: bool = False,
    ) -> list[tuple[int, AuditEvent]]:
        codec.check_audit_query(after, limit)
        if codec.has_nul(task, agent, owner, decision, exception, tool, txn):
            return []
        c = t.audit_events.c
        query = select(t.audit_events).limit(limit)
        if descending:
            query = query.order_by(c.seq.desc())
        else:
            query = query.where(c.seq > after).order_by(c.seq)
        for column, value in (
            (c.task, task),
            (c.agent, agent),
            (c.owner, owner),
            (c.decision, decision),
            (c.exception_id, exception),
            (c.tool, tool),
            (c.txn, txn),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(c.time >= codec.utc(since))
        if until is not None:
            query = query.where(c.time < codec.utc(until))
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.audit_from(r) for r in rows]

    def _gateway_calls(self, since: datetime, until: datetime) -> ColumnElement[bool]:
        c = t.audit_events.c
        return (
            (c.event == GATEWAY_CALL) & (c.time >= codec.utc(since)) & (c.time < codec.utc(until))
        )

    async def audit_usage(self, *, since: datetime, until: datetime) -> list[UsageRow]:
        c = t.audit_events.c
        keys = (c.agent, c.owner, c.task, c.tool, c.action, c.tier, c.decision)
        query = (
            select(*keys, func.count().label("calls"), func.max(c.time).label("last_used"))
            .where(self._gateway_calls(since, until))
            .group_by(*keys)
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [
            UsageRow(
                agent=row[0],
                owner=row[1],
                task=row[2],
                tool=row[3],
                action=row[4],
                tier=row[5],
                decision=row[6],
                calls=int(row[7]),
                last_used=_aware(row[8]),
            )
            for row in rows
        ]

    async def audit_timeline(
        self, *, since: datetime, until: datetime, agents: Sequence[str] | None = None
    ) -> list[TimelineRow]:
        c = t.audit_events.c
        # The UTC calendar day: SQLite keeps the UTC wall time as sortable text.
        day = (
            func.to_char(func.timezone("UTC", c.time), "YYYY-MM-DD")
            if self._postgres
            else func.substr(c.time, 1, 10)
        ).label("day")
        query = (
            select(day, c.decision, func.count())
            .where(self._gateway_calls(since, until))
            .group_by(day, c.decision)
        )
        if agents is not None:
            if codec.has_nul(*agents):
                agents = [a for a in agents if not codec.has_nul(a)]
            query = query.where(c.agent.in_(list(agents)))
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [TimelineRow(str(d), str(decision), int(n)) for d, decision, n in rows]

    # --- approvals -------------------------------------------------------------------------

    @staticmethod
    def _approvals_due(now: datetime) -> ColumnElement[bool]:
        """Open approvals past their time: pending past expires_at, approved past use_by."""
        a = t.approvals.c
        return ((a.state == _PENDING) & (a.expires_at <= now)) | (
            (a.state == _APPROVED) & (a.use_by <= now)
        )

    async def request_approval(self, approval: Approval) -> Approval:
        codec.check_new_approval(approval)
        row = codec.approval_row(approval)
        now = row["created_at"]
        a = t.approvals.c
        same = (
            (a.task_id == approval.task_id)
            & (a.action_digest == approval.action_digest)
            & (a.open_slot == codec.OPEN_SLOT)
        )
        expire = (
            update(t.approvals)
            .where(same, self._approvals_due(now))
            .values(state=ApprovalState.EXPIRED.value, open_slot=None)
        )
        # A concurrent request for the same (task, digest) waits on the unique constraint
        # (PostgreSQL) or on the write lock (SQLite), then inserts nothing and reads the
        # winner's row below.
        insert = (
            self._insert(t.approvals)
            .values(row)
            .on_conflict_do_nothing(index_elements=[a.task_id, a.action_digest, a.open_slot])
        )
        async with self._transaction(write=True) as conn:
            await conn.execute(expire)
            await conn.execute(insert)
            found = (await conn.execute(select(t.approvals).where(same))).mappings().first()
        if found is None:
            raise TaskboundError(internal="approvals: no open approval right after inserting one")
        return codec.approval_from(found)

    async def get_approval(self, approval_id: str) -> Approval | None:
        if codec.has_nul(approval_id):
            return None
        async with self._transaction() as conn:
            row = (
                (await conn.execute(select(t.approvals).where(t.approvals.c.id == approval_id)))
                .mappings()
                .first()
            )
        return None if row is None else codec.approval_from(row)

    async def list_approvals(
        self,
        *,
        state: ApprovalState | None = None,
        task_id: str | None = None,
        limit: int = 100,
    ) -> list[Approval]:
        codec.check_approval_query(limit)
        if codec.has_nul(task_id):
            return []
        a = t.approvals.c
        query = (
            select(t.approvals).order_by(a.created_at.desc(), self._text_order(a.id)).limit(limit)
        )
        if state is not None:
            query = query.where(a.state == ApprovalState(state).value)
        if task_id is not None:
            query = query.where(a.task_id == task_id)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.approval_from(r) for r in rows]

    async def list_approval_votes(self, approval_id: str) -> list[ApprovalVote]:
        if codec.has_nul(approval_id):
            return []
        v = t.approval_votes.c
        query = (
            select(t.approval_votes)
            .where(v.approval_id == approval_id)
            .order_by(v.voted_at, self._text_order(v.approver))
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.vote_from(r) for r in rows]

    async def vote_approval(
        self,
        approval_id: str,
        approver: str,
        approve: bool,
        reason: str | None,
        now: datetime,
        use_ttl: timedelta,
    ) -> Approval:
        now = codec.utc(now)
        if codec.has_nul(approval_id):
            raise NotFound(internal="approvals: no such row")
        vote = codec.vote_row(ApprovalVote(approval_id, approver, approve, reason, now))
        a, v = t.approvals.c, t.approval_votes.c
        expired: ApprovalExpired | None = None
        async with self._transaction(write=True) as conn:
            # The row lock (PostgreSQL; SQLite's writers are serialised) makes concurrent
            # votes on one approval apply one after the other, each seeing the last.
            row = (
                (
                    await conn.execute(
                        select(t.approvals).where(a.id == approval_id).with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(internal=f"approvals: no row {approval_id!r}")
            current = codec.approval_from(row)
            voted = set(
                (
                    await conn.execute(select(v.approver).where(v.approval_id == approval_id))
                ).scalars()
            )
            try:
                new = cast_vote(
                    current,
                    approver=approver,
                    approve=approve,
                    reason=reason,
                    now=now,
                    use_ttl=use_ttl,
                    voted=voted,
                )
            except ApprovalExpired as exc:
                # Recorded, and kept: the refusal is raised once this commits.
                expired = exc
                if due_to_expire(current, now):
                    await conn.execute(
                        update(t.approvals)
                        .where(a.id == approval_id, a.state == current.state.value)
                        .values(state=ApprovalState.EXPIRED.value, open_slot=None)
                    )
            else:
                await conn.execute(t.approval_votes.insert().values(vote))
                changed = await conn.execute(
                    update(t.approvals)
                    .where(
                        a.id == approval_id, a.state == _PENDING, a.approvals == current.approvals
                    )
                    .values(codec.approval_changes(new))
                    .execution_options(preserve_rowcount=True)
                )
                if changed.rowcount != 1:
                    raise Conflict(internal=f"approval {approval_id} changed concurrently")
        if expired is not None:
            raise expired
        return new

    async def consume_approval(
        self, task_id: str, action_digest: str, now: datetime
    ) -> Approval | None:
        now = codec.utc(now)
        if codec.has_nul(task_id, action_digest):
            return None
        a = t.approvals.c
        # One conditional UPDATE: PostgreSQL re-checks the WHERE on the locked row after
        # any wait, and SQLite runs writers one at a time, so exactly one consumer wins.
        consume = (
            update(t.approvals)
            .where(
                a.task_id == task_id,
                a.action_digest == action_digest,
                a.state == _APPROVED,
                a.use_by > now,
            )
            .values(state=ApprovalState.CONSUMED.value, open_slot=None, consumed_at=now)
            .returning(*t.approvals.c)
        )
        async with self._transaction(write=True) as conn:
            row = (await conn.execute(consume)).mappings().first()
        return None if row is None else codec.approval_from(row)

    async def expire_approvals(self, now: datetime) -> int:
        now = codec.utc(now)
        expire = (
            update(t.approvals)
            .where(self._approvals_due(now))
            .values(state=ApprovalState.EXPIRED.value, open_slot=None)
            .execution_options(preserve_rowcount=True)
        )
        async with self._transaction(write=True) as conn:
            changed = (await conn.execute(expire)).rowcount
        return int(changed)

    # --- break-glass exceptions ------------------------------------------------------------

    async def create_breakglass(self, bg: BreakGlass) -> None:
        codec.check_new_breakglass(bg)
        await self._execute_one(t.breakglass.insert(), codec.breakglass_row(bg))

    async def get_breakglass(self, bg_id: str) -> BreakGlass | None:
        if codec.has_nul(bg_id):
            return None
        async with self._transaction() as conn:
            row = await self._breakglass_row(conn, bg_id)
        return None if row is None else codec.breakglass_from(row)

    @staticmethod
    async def _breakglass_row(
        conn: AsyncConnection, bg_id: str, *, lock: bool = False
    ) -> RowMapping | None:
        query = select(t.breakglass).where(t.breakglass.c.id == bg_id)
        if lock:
            query = query.with_for_update()
        return (await conn.execute(query)).mappings().first()

    @staticmethod
    def _breakglass_ended_by(when: datetime) -> ColumnElement[bool]:
        """Exceptions that ended (early or by their expiry) at or before ``when``."""
        b = t.breakglass.c
        return (b.expires_at <= when) | (b.ended_at.is_not(None) & (b.ended_at <= when))

    async def list_breakglass(
        self,
        *,
        now: datetime,
        state: str | None = None,
        agent_id: str | None = None,
        limit: int = 100,
    ) -> list[BreakGlass]:
        codec.check_breakglass_query(state, limit)
        now = codec.utc(now)
        if codec.has_nul(agent_id):
            return []
        b = t.breakglass.c
        query = (
            select(t.breakglass).order_by(b.created_at.desc(), self._text_order(b.id)).limit(limit)
        )
        if agent_id is not None:
            query = query.where(b.agent_id == agent_id)
        if state == "active":
            query = query.where(b.created_at <= now, ~self._breakglass_ended_by(now))
        elif state == "review":
            query = query.where(b.reviewed_at.is_(None), self._breakglass_ended_by(now))
        elif state == "reviewed":
            query = query.where(b.reviewed_at.is_not(None))
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [codec.breakglass_from(r) for r in rows]

    async def end_breakglass(
        self, bg_id: str, by: str, now: datetime, *, reason: str
    ) -> tuple[BreakGlass, int]:
        codec.check_text(by=by, reason=reason)
        now = codec.utc(now)
        if codec.has_nul(bg_id):
            raise NotFound(internal="breakglass: no such row")
        c = t.credentials.c
        async with self._transaction(write=True) as conn:
            # The row lock orders concurrent ends: the second sees the first's end.
            row = await self._breakglass_row(conn, bg_id, lock=True)
            if row is None:
                raise NotFound(internal=f"breakglass: no row {bg_id!r}")
            ended = breakglass.end(codec.breakglass_from(row), by=by, now=now)
            await conn.execute(
                update(t.breakglass)
                .where(t.breakglass.c.id == bg_id)
                .values(ended_at=ended.ended_at, ended_by=ended.ended_by)
            )
            revoked = await self._revoke_tree(
                conn, (c.exception_id == bg_id) & (c.expires_at > now), reason, now
            )
            await self._log(
                conn, [codec.credential_entry(r, now, "breakglass", reason) for r in revoked]
            )
        return ended, len(revoked)

    async def review_breakglass(
        self, bg_id: str, reviewer: str, note: str, now: datetime
    ) -> BreakGlass:
        codec.check_text(reviewer=reviewer, note=note)
        now = codec.utc(now)
        if codec.has_nul(bg_id):
            raise NotFound(internal="breakglass: no such row")
        async with self._transaction(write=True) as conn:
            row = await self._breakglass_row(conn, bg_id, lock=True)
            if row is None:
                raise NotFound(internal=f"breakglass: no row {bg_id!r}")
            reviewed = breakglass.review(
                codec.breakglass_from(row), reviewer=reviewer, note=note, now=now
            )
            await conn.execute(
                update(t.breakglass)
                .where(t.breakglass.c.id == bg_id)
                .values(
                    reviewed_by=reviewed.reviewed_by,
                    reviewed_at=reviewed.reviewed_at,
                    review_note=reviewed.review_note,
                )
            )
        return reviewed

    async def count_overdue_breakglass(self, now: datetime, review_within: timedelta) -> int:
        cutoff = codec.utc(now) - review_within
        query = (
            select(func.count())
            .select_from(t.breakglass)
            .where(t.breakglass.c.reviewed_at.is_(None), self._breakglass_ended_by(cutoff))
        )
        async with self._transaction() as conn:
            return int(await conn.scalar(query) or 0)

    # --- web UI sign-in --------------------------------------------------------------------

    async def set_owner_password(self, owner_id: str, password_hash: str, now: datetime) -> None:
        codec.check_text(owner_id=owner_id, password_hash=password_hash)
        row = {"owner_id": owner_id, "password_hash": password_hash, "updated_at": codec.utc(now)}
        p = t.owner_passwords.c
        upsert = (
            self._insert(t.owner_passwords)
            .values(row)
            .on_conflict_do_update(
                index_elements=[p.owner_id],
                set_={"password_hash": password_hash, "updated_at": row["updated_at"]},
            )
        )
        async with self._transaction(write=True) as conn:
            await conn.execute(upsert)
            # A new password signs the person out everywhere.
            await conn.execute(delete(t.ui_sessions).where(t.ui_sessions.c.owner_id == owner_id))

    async def get_owner_password(self, owner_id: str) -> str | None:
        if codec.has_nul(owner_id):
            return None
        p = t.owner_passwords.c
        async with self._transaction() as conn:
            found = await conn.scalar(select(p.password_hash).where(p.owner_id == owner_id))
        return None if found is None else str(found)

    async def create_session(self, session: UiSession) -> None:
        await self._execute_one(t.ui_sessions.insert(), codec.session_row(session))

    async def get_session(self, id_hash: str, now: datetime) -> UiSession | None:
        if codec.has_nul(id_hash):
            return None
        u = t.ui_sessions.c
        query = select(t.ui_sessions).where(u.id_hash == id_hash, u.expires_at > codec.utc(now))
        async with self._transaction() as conn:
            row = (await conn.execute(query)).mappings().first()
        return None if row is None else codec.session_from(row)

    async def delete_session(self, id_hash: str) -> None:
        if codec.has_nul(id_hash):
            return
        async with self._transaction(write=True) as conn:
            await conn.execute(delete(t.ui_sessions).where(t.ui_sessions.c.id_hash == id_hash))

    async def prune_sessions(self, now: datetime) -> int:
        prune = (
            delete(t.ui_sessions)
            .where(t.ui_sessions.c.expires_at <= codec.utc(now))
            .execution_options(preserve_rowcount=True)
        )
        async with self._transaction(write=True) as conn:
            return int((await conn.execute(prune)).rowcount)


def _aware(value: Any) -> datetime:
    """A time read back from an aggregate: SQLite may hand back its text form."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a time: {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
