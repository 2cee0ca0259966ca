"""The in-memory twin of :class:`~taskbound.storage.sql.SqlStorage`, for tests and demos.

It keeps the same rows the SQL backend keeps (built by :mod:`taskbound.storage.codec`, with
JSON fields held as JSON text), enforces the same unique and foreign-key rules, raises the
same errors and orders lists the same way. Each method runs to completion without awaiting,
so on one event loop every method is atomic; it checks everything before it changes
anything, so a refused call leaves no trace. It is not shared between threads or processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import JSON, Table

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
from taskbound.errors import Conflict, NotFound, ReferenceError_
from taskbound.storage import codec, schema
from taskbound.storage.base import GrantInputs
from taskbound.storage.codec import Row

T = TypeVar("T")


class _Table:
    """Rows of one table by primary key, stored encoded: JSON columns as JSON text, so that
    an unencodable value fails before anything is stored and a read never hands out an
    object the store still holds."""

    def __init__(self, table: Table) -> None:
        self.name = table.name
        self._json = frozenset(c.name for c in table.columns if isinstance(c.type, JSON))
        self._rows: dict[str, Row] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def encode(self, row: Row) -> Row:
        return {k: codec.dump_json(v) if k in self._json else v for k, v in row.items()}

    def decode(self, row: Row) -> Row:
        return {k: codec.load_json(v) if k in self._json else v for k, v in row.items()}

    def get(self, key: str) -> Row | None:
        stored = self._rows.get(key)
        return None if stored is None else self.decode(stored)

    def rows(self) -> list[tuple[str, Row]]:
        """(key, encoded row) pairs; filter on plain columns, then decode what is kept."""
        return list(self._rows.items())

    def insert(self, key: str, encoded: Row) -> None:
        self._rows[key] = encoded

    def update(self, key: str, encoded_changes: Row) -> None:
        self._rows[key] = {**self._rows[key], **encoded_changes}

    def delete(self, key: str) -> None:
        del self._rows[key]


def _decoded(table: _Table, rows: Iterable[Row], decode: Callable[[Row], T]) -> list[T]:
    return [decode(table.decode(r)) for r in rows]


class _Descending:
    """Inverts the order of a time inside a sort key (newest first)."""

    __slots__ = ("value",)

    def __init__(self, value: datetime) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return self.value > other.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.value == other.value

    __hash__ = None  # type: ignore[assignment]


class MemoryStorage:
    """A :class:`~taskbound.storage.base.Storage` held in process memory."""

    def __init__(self) -> None:
        self._owners = _Table(schema.owners)
        self._agents = _Table(schema.agents)
        self._tools = _Table(schema.tools)
        self._tasks = _Table(schema.tasks)
        self._credentials = _Table(schema.credentials)
        self._keys = _Table(schema.signing_keys)
        self._admin_tokens = _Table(schema.admin_tokens)
        # Keyed by str(seq), inserted in seq order; never updated or deleted.
        self._audit = _Table(schema.audit_events)
        self._audit_seq = 0

    async def check(self) -> None:
        """Always healthy: there is no backend to lose."""

    async def close(self) -> None:
        """Nothing to release; the data lives as long as the object."""

    # --- registry --------------------------------------------------------------------------

    async def create_owner(self, owner: Owner) -> None:
        row = self._owners.encode(codec.owner_row(owner))
        _require_new(self._owners, owner.id)
        self._owners.insert(owner.id, row)

    async def update_owner(self, owner: Owner) -> None:
        row = self._owners.encode(codec.owner_row(owner))
        del row["created_at"]
        _require_existing(self._owners, owner.id)
        self._owners.update(owner.id, row)
        if owner.disabled:
            self._revoke_tasks(
                lambda r: r["owner_id"] == owner.id,
                codec.OWNER_DISABLED_REASON,
                codec.utc(owner.updated_at),
            )

    async def get_owner(self, owner_id: str) -> Owner | None:
        row = self._owners.get(owner_id)
        return None if row is None else codec.owner_from(row)

    async def list_owners(self) -> list[Owner]:
        rows = sorted((r for _, r in self._owners.rows()), key=lambda r: r["id"])
        return _decoded(self._owners, rows, codec.owner_from)

    async def create_agent(self, agent: Agent) -> None:
        row = self._agents.encode(codec.agent_row(agent))
        _require_new(self._agents, agent.spiffe_id)
        _require_reference(self._owners, agent.owner_id)
        self._agents.insert(agent.spiffe_id, row)

    async def update_agent(self, agent: Agent) -> None:
        row = self._agents.encode(codec.agent_row(agent))
        del row["created_at"]
        _require_existing(self._agents, agent.spiffe_id)
        _require_reference(self._owners, agent.owner_id)
        self._agents.update(agent.spiffe_id, row)
        if agent.state is not AgentState.ACTIVE:
            self._revoke_tasks(
                lambda r: r["agent_id"] == agent.spiffe_id,
                codec.agent_state_reason(agent.state),
                codec.utc(agent.updated_at),
            )

    async def get_agent(self, spiffe_id: str) -> Agent | None:
        row = self._agents.get(spiffe_id)
        return None if row is None else codec.agent_from(row)

    async def list_agents(self, owner_id: str | None = None) -> list[Agent]:
        rows = sorted(
            (r for _, r in self._agents.rows() if owner_id is None or r["owner_id"] == owner_id),
            key=lambda r: r["spiffe_id"],
        )
        return _decoded(self._agents, rows, codec.agent_from)

    async def set_agent_state(
        self, spiffe_id: str, state: AgentState, now: datetime
    ) -> Agent | None:
        now = codec.utc(now)
        changes = {"state": AgentState(state).value, "updated_at": now}
        if spiffe_id not in self._agents:
            return None
        self._agents.update(spiffe_id, changes)
        if AgentState(state) is not AgentState.ACTIVE:
            self._revoke_tasks(
                lambda r: r["agent_id"] == spiffe_id,
                codec.agent_state_reason(state),
                now,
            )
        return await self.get_agent(spiffe_id)

    async def create_tool(self, tool: Tool, secret_ciphertext: bytes | None) -> None:
        row = self._tools.encode(codec.tool_row(tool))
        row["secret_ciphertext"] = None if secret_ciphertext is None else bytes(secret_ciphertext)
        _require_new(self._tools, tool.id)
        _require_unique(self._tools, "audience", tool.audience)
        self._tools.insert(tool.id, row)

    async def update_tool(self, tool: Tool, secret_ciphertext: bytes | None) -> None:
        row = self._tools.encode(codec.tool_row(tool))
        del row["created_at"]
        if secret_ciphertext is not None:
            row["secret_ciphertext"] = bytes(secret_ciphertext)
        _require_existing(self._tools, tool.id)
        _require_unique(self._tools, "audience", tool.audience, besides=tool.id)
        self._tools.update(tool.id, row)

    async def get_tool(self, tool_id: str) -> Tool | None:
        row = self._tools.get(tool_id)
        return None if row is None else codec.tool_from(row)

    async def load_grant_inputs(
        self, spiffe_id: str, owner_id: str, tool_ids: Sequence[str]
    ) -> GrantInputs:
        tools = {}
        for tool_id in tool_ids:
            tool = await self.get_tool(tool_id)
            if tool is not None:
                tools[tool.id] = tool
        return GrantInputs(await self.get_agent(spiffe_id), await self.get_owner(owner_id), tools)

    async def list_tools(self) -> list[Tool]:
        rows = sorted((r for _, r in self._tools.rows()), key=lambda r: r["id"])
        return _decoded(self._tools, rows, codec.tool_from)

    async def get_tool_secret(self, tool_id: str) -> bytes | None:
        row = self._tools.get(tool_id)
        return None if row is None else row["secret_ciphertext"]

    # --- keys ------------------------------------------------------------------------------

    async def insert_active_key(self, key: SigningKey) -> SigningKey:
        row = self._keys.encode(codec.new_active_key_row(key))
        active = self._active_kid(KeyPurpose(key.purpose))
        if active is None:
            _require_new(self._keys, key.kid)
            self._keys.insert(key.kid, row)
            active = key.kid
        stored = self._keys.get(active)
        assert stored is not None
        return codec.key_from(stored)

    async def rotate_key(self, new_key: SigningKey, retire_after: datetime) -> None:
        row = self._keys.encode(codec.new_active_key_row(new_key))
        retiring = {
            "state": KeyState.RETIRING.value,
            "retire_after": codec.utc(retire_after),
            "active_slot": None,
        }
        _require_new(self._keys, new_key.kid)
        old = self._active_kid(KeyPurpose(new_key.purpose))
        if old is not None:
            self._keys.update(old, retiring)
        self._keys.insert(new_key.kid, row)

    async def list_keys(self, purpose: KeyPurpose | None = None) -> list[SigningKey]:
        wanted = None if purpose is None else KeyPurpose(purpose).value
        rows = sorted(
            (r for _, r in self._keys.rows() if wanted is None or r["purpose"] == wanted),
            key=lambda r: (_Descending(r["created_at"]), r["active_slot"] is None, r["kid"]),
        )
        return _decoded(self._keys, rows, codec.key_from)

    async def prune_keys(self, now: datetime) -> int:
        now = codec.utc(now)
        doomed = [
            kid
            for kid, r in self._keys.rows()
            if r["state"] == KeyState.RETIRING.value and r["retire_after"] <= now
        ]
        for kid in doomed:
            self._keys.delete(kid)
        return len(doomed)

    def _active_kid(self, purpose: KeyPurpose) -> str | None:
        for kid, r in self._keys.rows():
            if r["purpose"] == purpose.value and r["active_slot"] == codec.ACTIVE_SLOT:
                return kid
        return None

    # --- tasks -----------------------------------------------------------------------------

    async def create_task(self, task: Task, credentials: Sequence[CredentialRecord]) -> bool:
        row = self._tasks.encode(codec.task_row(task))
        creds = [self._credentials.encode(codec.credential_row(c)) for c in credentials]
        _require_new(self._tasks, task.id)
        jtis = [c["jti"] for c in creds]
        if len(set(jtis)) != len(jtis):
            raise Conflict(internal="credentials: one jti twice in the same call")
        for jti in jtis:
            _require_new(self._credentials, jti)
        _require_reference(self._agents, task.agent_id)
        _require_reference(self._owners, task.owner_id)
        for cred in creds:
            if cred["task_id"] != task.id:
                _require_reference(self._tasks, cred["task_id"])
        agent, owner = self._agents.get(task.agent_id), self._owners.get(task.owner_id)
        assert agent is not None
        assert owner is not None
        if agent["state"] != AgentState.ACTIVE.value or owner["disabled"]:
            return False
        self._tasks.insert(task.id, row)
        for cred in creds:
            self._credentials.insert(cred["jti"], cred)
        return True

    async def get_task(self, task_id: str) -> Task | None:
        row = self._tasks.get(task_id)
        return None if row is None else codec.task_from(row)

    async def list_tasks(self, flt: TaskFilter) -> list[Task]:
        if flt.limit < 0:
            raise ValueError("TaskFilter.limit must not be negative")
        state = None if flt.state is None else TaskState(flt.state).value
        rows = sorted(
            (
                r
                for _, r in self._tasks.rows()
                if (flt.agent_id is None or r["agent_id"] == flt.agent_id)
                and (flt.owner_id is None or r["owner_id"] == flt.owner_id)
                and (state is None or r["state"] == state)
            ),
            key=lambda r: (_Descending(r["created_at"]), r["id"]),
        )
        return _decoded(self._tasks, rows[: flt.limit], codec.task_from)

    async def add_credential(self, credential: CredentialRecord, now: datetime) -> bool:
        row = self._credentials.encode(codec.credential_row(credential))
        now = codec.utc(now)
        task = self._tasks.get(credential.task_id)
        if task is None or task["state"] != TaskState.ACTIVE.value or now >= task["expires_at"]:
            return False
        _require_new(self._credentials, credential.jti)
        self._credentials.insert(credential.jti, row)
        return True

    async def get_credential(self, jti: str) -> CredentialRecord | None:
        row = self._credentials.get(jti)
        return None if row is None else codec.credential_from(row)

    async def list_credentials(self, task_id: str) -> list[CredentialRecord]:
        rows = sorted(
            (r for _, r in self._credentials.rows() if r["task_id"] == task_id),
            key=lambda r: (r["issued_at"], r["jti"]),
        )
        return _decoded(self._credentials, rows, codec.credential_from)

    async def end_task(
        self, task_id: str, state: TaskState, reason: str, now: datetime
    ) -> tuple[Task, bool] | None:
        state = TaskState(state)
        if state is TaskState.ACTIVE:
            raise ValueError("end_task needs a final state, not ACTIVE")
        codec.check_text(reason=reason)
        now = codec.utc(now)
        row = self._tasks.get(task_id)
        if row is None:
            return None
        if row["state"] != TaskState.ACTIVE.value:
            return codec.task_from(row), False
        self._end(task_id, state, reason, now)
        ended = self._tasks.get(task_id)
        assert ended is not None
        return codec.task_from(ended), True

    async def revoke_credential(self, jti: str, reason: str, now: datetime) -> bool:
        codec.check_text(reason=reason)
        now = codec.utc(now)
        row = self._credentials.get(jti)
        if row is None or row["revoked_at"] is not None or now >= row["expires_at"]:
            return False
        self._credentials.update(jti, {"revoked_at": now, "revoke_reason": reason})
        return True

    async def expire_tasks(self, now: datetime) -> list[str]:
        now = codec.utc(now)
        due = sorted(
            task_id
            for task_id, r in self._tasks.rows()
            if r["state"] == TaskState.ACTIVE.value and r["expires_at"] <= now
        )
        for task_id in due:
            self._end(task_id, TaskState.EXPIRED, codec.EXPIRED_REASON, now)
        return due

    def _revoke_tasks(self, which: Callable[[Row], bool], reason: str, now: datetime) -> None:
        """End every ACTIVE task matching ``which`` as REVOKED, with its credentials."""
        for task_id, r in list(self._tasks.rows()):
            if r["state"] == TaskState.ACTIVE.value and which(r):
                self._end(task_id, TaskState.REVOKED, reason, now)

    def _end(self, task_id: str, state: TaskState, reason: str, now: datetime) -> None:
        self._tasks.update(task_id, {"state": state.value, "ended_at": now, "end_reason": reason})
        for jti, r in self._credentials.rows():
            if r["task_id"] == task_id and r["revoked_at"] is None:
                self._credentials.update(jti, {"revoked_at": now, "revoke_reason": reason})

    # --- admin tokens ----------------------------------------------------------------------

    async def add_admin_token(self, token: AdminToken) -> None:
        row = self._admin_tokens.encode(codec.admin_token_row(token))
        _require_new(self._admin_tokens, token.id)
        _require_unique(self._admin_tokens, "token_hash", token.token_hash)
        self._admin_tokens.insert(token.id, row)

    async def find_admin_token(self, token_hash: str) -> AdminToken | None:
        for _, r in self._admin_tokens.rows():
            if r["token_hash"] == token_hash:
                return codec.admin_token_from(self._admin_tokens.decode(r))
        return None

    async def list_admin_tokens(self) -> list[AdminToken]:
        rows = sorted(
            (r for _, r in self._admin_tokens.rows()), key=lambda r: (r["created_at"], r["id"])
        )
        return _decoded(self._admin_tokens, rows, codec.admin_token_from)

    # --- audit log -------------------------------------------------------------------------

    async def append_audit(self, event: AuditEvent) -> int:
        (seq,) = await self.append_audits([event])
        return seq

    async def append_audits(self, events: Sequence[AuditEvent]) -> list[int]:
        rows = [self._audit.encode(codec.audit_row(e)) for e in events]  # all checked first
        seqs = []
        for row in rows:
            self._audit_seq += 1
            seq = self._audit_seq
            self._audit.insert(str(seq), {"seq": seq, **row})
            seqs.append(seq)
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
        rows = [
            r
            for _, r in self._audit.rows()
            if r["seq"] > after
            and (task is None or r["task"] == task)
            and (agent is None or r["agent"] == agent)
        ]
        return _decoded(self._audit, rows[:limit], codec.audit_from)


# The rules the SQL schema enforces with constraints, as checks run before any change.


def _require_new(table: _Table, key: str) -> None:
    if key in table:
        raise Conflict(internal=f"{table.name}: primary key {key!r} exists")


def _require_existing(table: _Table, key: str) -> None:
    if key not in table:
        raise NotFound(internal=f"{table.name}: no row {key!r}")


def _require_reference(table: _Table, key: str) -> None:
    if key not in table:
        raise ReferenceError_(internal=f"{table.name}: no row {key!r} to refer to")


def _require_unique(
    table: _Table, column: str, value: object, *, besides: str | None = None
) -> None:
    for key, r in table.rows():
        if key != besides and r[column] == value:
            raise Conflict(internal=f"{table.name}: {column} already in use")
