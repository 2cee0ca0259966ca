"""The in-memory twin of :class:`~taskbound.storage.sql.SqlStorage`, for tests and demos.

It keeps the same rows the SQL backend keeps (built by :mod:`taskbound.storage.codec`, with
JSON fields held as JSON text), enforces the same unique and foreign-key rules, raises the
same errors and orders lists the same way. Each method runs to completion without awaiting,
so on one event loop every method is atomic; it checks everything before it changes
anything, so a refused call leaves no trace. It is not shared between threads or processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeVar

from sqlalchemy import JSON, Table

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
)
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
        self._checkpoints = _Table(schema.audit_checkpoints)
        self._revocations: list[Revocation] = []  # in seq order
        self._revocation_seq = 0
        self._cursors: dict[str, int] = {}
        self._approvals = _Table(schema.approvals)
        # Keyed by approval id, NUL, approver (no stored text holds a NUL).
        self._votes = _Table(schema.approval_votes)
        self._breakglass = _Table(schema.breakglass)
        self._passwords = _Table(schema.owner_passwords)
        self._sessions = _Table(schema.ui_sessions)

    async def check(self) -> None:
        """Always healthy: there is no backend to lose."""

    async def close(self) -> None:
        """Nothing to release; the data lives as long as the object."""

    # --- registry --------------------------------------------------------------------------

    async def create_owner(self, owner: Owner) -> None:
        row = self._owners.encode(codec.owner_row(owner))
        _require_new(self._owners, owner.id)
        self._owners.insert(owner.id, row)

    async def update_owner(
        self, owner: Owner, *, cause: str = "system", reason: str | None = None
    ) -> None:
        codec.check_text(cause=cause, reason=reason)
        row = self._owners.encode(codec.owner_row(owner))
        del row["created_at"]
        _require_existing(self._owners, owner.id)
        was = self._owners.get(owner.id)
        assert was is not None
        now = codec.utc(owner.updated_at)
        self._owners.update(owner.id, row)
        log: list[Revocation] = []
        if bool(was["disabled"]) != owner.disabled:
            log.append(codec.owner_entry(owner, now, cause, reason))
        if owner.disabled:
            why = reason or codec.OWNER_DISABLED_REASON
            log += self._revoke_tasks(lambda r: r["owner_id"] == owner.id, why, now, cause)
            # Credentials delegated to the owner's agents within other tasks, and theirs.
            theirs = {sid for sid, r in self._agents.rows() if r["owner_id"] == owner.id}
            held = [
                jti
                for jti, r in self._credentials.rows()
                if r["agent_id"] in theirs and r["expires_at"] > now
            ]
            revoked = self._revoke_tree(held, why, now)
            log += [codec.credential_entry(r, now, cause, why) for r in revoked]
        self._log(log)

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

    async def update_agent(
        self, agent: Agent, *, cause: str = "system", reason: str | None = None
    ) -> None:
        codec.check_text(cause=cause, reason=reason)
        row = self._agents.encode(codec.agent_row(agent))
        del row["created_at"]
        _require_existing(self._agents, agent.spiffe_id)
        _require_reference(self._owners, agent.owner_id)
        self._change_agent(agent.spiffe_id, row, AgentState(agent.state), cause, reason)

    def _change_agent(
        self, spiffe_id: str, changes: Row, state: AgentState, cause: str, reason: str | None
    ) -> None:
        was = self._agents.get(spiffe_id)
        assert was is not None
        if was["state"] == AgentState.RETIRED.value and state is not AgentState.RETIRED:
            raise Conflict(codec.RETIRED_IS_FINAL)
        now = codec.utc(changes["updated_at"])
        self._agents.update(spiffe_id, changes)
        log: list[Revocation] = []
        if was["state"] != state.value:
            log.append(codec.agent_entry(spiffe_id, state, now, cause, reason))
        if state is not AgentState.ACTIVE:
            why = reason or codec.agent_state_reason(state)
            log += self._revoke_tasks(lambda r: r["agent_id"] == spiffe_id, why, now, cause)
            # Credentials delegated to the agent within other agents' tasks, and theirs.
            held = [
                jti
                for jti, r in self._credentials.rows()
                if r["agent_id"] == spiffe_id and r["expires_at"] > now
            ]
            revoked = self._revoke_tree(held, why, now)
            log += [codec.credential_entry(r, now, cause, why) for r in revoked]
        self._log(log)

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
        if spiffe_id not in self._agents:
            return None
        self._change_agent(
            spiffe_id, {"state": state.value, "updated_at": now}, state, cause, reason
        )
        return await self.get_agent(spiffe_id)

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
        was = self._agents.get(spiffe_id)
        if was is None:
            return None
        if was["state"] == state.value:
            return codec.agent_from(was), False
        self._change_agent(
            spiffe_id, {"state": state.value, "updated_at": now}, state, cause, reason
        )
        agent = await self.get_agent(spiffe_id)
        assert agent is not None
        return agent, True

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
        found = self._keys.get(kid)
        if found is None:
            return None
        active = found["active_slot"] == codec.ACTIVE_SLOT
        new_row = None
        if active:
            if replacement is None:
                raise ValueError("withdrawing the active key needs a replacement")
            if replacement.purpose.value != found["purpose"]:
                raise ValueError("the replacement key must have the withdrawn key's purpose")
            new_row = self._keys.encode(codec.new_active_key_row(replacement))
            _require_new(self._keys, replacement.kid)
        self._keys.delete(kid)
        if new_row is not None:
            self._keys.insert(new_row["kid"], new_row)
        roots = [
            jti for jti, r in self._credentials.rows() if r["kid"] == kid and r["expires_at"] > now
        ]
        revoked = self._revoke_tree(roots, reason, now)
        log = [codec.key_entry(kid, now, cause, reason)]
        log += [codec.credential_entry(r, now, cause, reason) for r in revoked]
        self._log(log)
        return len(revoked)

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
        self._require_exceptions(credentials, codec.utc(task.created_at))
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
        since = None if flt.created_since is None else codec.utc(flt.created_since)
        until = None if flt.created_until is None else codec.utc(flt.created_until)
        rows = sorted(
            (
                r
                for _, r in self._tasks.rows()
                if (flt.agent_id is None or r["agent_id"] == flt.agent_id)
                and (flt.owner_id is None or r["owner_id"] == flt.owner_id)
                and (state is None or r["state"] == state)
                and (since is None or r["created_at"] >= since)
                and (until is None or r["created_at"] < until)
            ),
            key=lambda r: (_Descending(r["created_at"]), r["id"]),
        )
        return _decoded(self._tasks, rows[: flt.limit], codec.task_from)

    async def task_agents(self, task_ids: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for task_id in task_ids:
            row = None if task_id in out else self._tasks.get(task_id)
            if row is not None:
                out[task_id] = row["agent_id"]
        return out

    async def add_credential(self, credential: CredentialRecord, now: datetime) -> bool:
        row = self._credentials.encode(codec.credential_row(credential))
        now = codec.utc(now)
        task = self._tasks.get(credential.task_id)
        self._require_exceptions([credential], now)
        if task is None or task["state"] != TaskState.ACTIVE.value or now >= task["expires_at"]:
            return False
        _require_new(self._credentials, credential.jti)
        self._credentials.insert(credential.jti, row)
        return True

    def _exceptions_hold(self, credentials: Sequence[CredentialRecord], now: datetime) -> bool:
        """Whether every break-glass exception these credentials rely on is in force."""
        for cred in credentials:
            if cred.exception_id is None:
                continue
            row = self._breakglass.get(cred.exception_id)
            if row is None or not codec.breakglass_from(row).active_at(now):
                return False
        return True

    def _require_exceptions(self, credentials: Sequence[CredentialRecord], now: datetime) -> None:
        if not self._exceptions_hold(credentials, now):
            raise BREAKGLASS_ERRORS["already_ended"](
                "the break-glass exception ended while the grant was decided"
            )

    async def add_derived_credential(
        self, credential: CredentialRecord, now: datetime, *, single_use: bool
    ) -> bool:
        parent_jti = credential.parent_jti
        if parent_jti is None:
            raise ValueError("a derived credential needs a parent_jti")
        row = self._credentials.encode(codec.credential_row(credential))
        now = codec.utc(now)
        parent = self._credentials.get(parent_jti)
        task = self._tasks.get(credential.task_id)
        holder = self._agents.get(credential.agent_id)
        holder_owner = None if holder is None else self._owners.get(holder["owner_id"])
        if (
            holder is None
            or holder["state"] != AgentState.ACTIVE.value
            or holder_owner is None
            or holder_owner["disabled"]
        ):
            return False
        if (
            parent is None
            or parent["revoked_at"] is not None
            or now >= parent["expires_at"]
            or (single_use and parent["exchange_count"] > 0)
            or task is None
            or task["state"] != TaskState.ACTIVE.value
            or now >= task["expires_at"]
            or not self._exceptions_hold([credential], now)
        ):
            return False
        _require_new(self._credentials, credential.jti)
        self._credentials.update(parent_jti, {"exchange_count": parent["exchange_count"] + 1})
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
        self, task_id: str, state: TaskState, reason: str, now: datetime, *, cause: str = "agent"
    ) -> tuple[Task, bool] | None:
        state = TaskState(state)
        if state is TaskState.ACTIVE:
            raise ValueError("end_task needs a final state, not ACTIVE")
        codec.check_text(reason=reason, cause=cause)
        now = codec.utc(now)
        row = self._tasks.get(task_id)
        if row is None:
            return None
        if row["state"] != TaskState.ACTIVE.value:
            return codec.task_from(row), False
        self._log(self._end([task_id], state, reason, now, cause))
        ended = self._tasks.get(task_id)
        assert ended is not None
        return codec.task_from(ended), True

    async def revoke_credential(
        self, jti: str, reason: str, now: datetime, *, cause: str = "system"
    ) -> bool:
        codec.check_text(reason=reason, cause=cause)
        now = codec.utc(now)
        row = self._credentials.get(jti)
        if row is None or row["revoked_at"] is not None or now >= row["expires_at"]:
            return False
        revoked = self._revoke_tree([jti], reason, now)
        self._log([codec.credential_entry(r, now, cause, reason) for r in revoked])
        return True

    async def expire_tasks(self, now: datetime) -> list[str]:
        now = codec.utc(now)
        due = sorted(
            task_id
            for task_id, r in self._tasks.rows()
            if r["state"] == TaskState.ACTIVE.value and r["expires_at"] <= now
        )
        self._log(self._end(due, TaskState.EXPIRED, codec.EXPIRED_REASON, now, "expiry"))
        return due

    def _revoke_tasks(
        self, which: Callable[[Row], bool], reason: str, now: datetime, cause: str
    ) -> list[Revocation]:
        """End every ACTIVE task matching ``which`` as REVOKED, with its credentials."""
        due = [
            task_id
            for task_id, r in self._tasks.rows()
            if r["state"] == TaskState.ACTIVE.value and which(r)
        ]
        return self._end(due, TaskState.REVOKED, reason, now, cause)

    def _end(
        self, task_ids: Sequence[str], state: TaskState, reason: str, now: datetime, cause: str
    ) -> list[Revocation]:
        """End these tasks together, as the SQL store does: a TASK entry each, then their
        credentials and descendants revoked, with a CREDENTIAL entry for each descendant
        of a task not ended here."""
        ended = set(task_ids)
        log: list[Revocation] = []
        for task_id in task_ids:
            changes = {"state": state.value, "ended_at": now, "end_reason": reason}
            self._tasks.update(task_id, changes)
            task = self._tasks.get(task_id)
            assert task is not None
            log.append(
                codec.task_entry(task_id, task["agent_id"], task["expires_at"], now, cause, reason)
            )
        roots = [jti for jti, r in self._credentials.rows() if r["task_id"] in ended]
        log += [
            codec.credential_entry(r, now, cause, reason)
            for r in self._revoke_tree(roots, reason, now)
            if r.task_id not in ended
        ]
        return log

    def _revoke_tree(
        self, roots: Sequence[str], reason: str, now: datetime
    ) -> list[SimpleNamespace]:
        """Revoke ``roots`` and all their descendants not revoked yet, as the SQL store does;
        (jti, task_id, agent_id, expires_at) of those revoked now."""
        children: dict[str, list[str]] = {}
        for jti, r in self._credentials.rows():
            if r["parent_jti"] is not None:
                children.setdefault(r["parent_jti"], []).append(jti)
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            jti = todo.pop()
            if jti not in seen:
                seen.add(jti)
                todo += children.get(jti, [])
        revoked = []
        for jti in sorted(seen):
            cred = self._credentials.get(jti)
            if cred is not None and cred["revoked_at"] is None:
                self._credentials.update(jti, {"revoked_at": now, "revoke_reason": reason})
                revoked.append(
                    SimpleNamespace(
                        jti=jti,
                        task_id=cred["task_id"],
                        agent_id=cred["agent_id"],
                        expires_at=cred["expires_at"],
                    )
                )
        return revoked

    def _log(self, entries: Sequence[Revocation]) -> None:
        for entry in entries:
            codec.revocation_row(entry)  # the same checks as the SQL store
            self._revocation_seq += 1
            self._revocations.append(replace(entry, seq=self._revocation_seq))

    # --- revocation log --------------------------------------------------------------------

    async def list_revocations(
        self, *, after: int = 0, limit: int = 1000, live_at: datetime | None = None
    ) -> list[Revocation]:
        codec.check_revocation_query(after, limit)
        live = None if live_at is None else codec.utc(live_at)
        found = [
            e
            for e in self._revocations
            if e.seq > after and (live is None or e.expires_at is None or e.expires_at > live)
        ]
        return found[:limit]

    async def last_revocation_seq(self) -> int:
        return self._revocations[-1].seq if self._revocations else 0

    async def prune_revocations(self, now: datetime) -> int:
        now = codec.utc(now)
        kept = [e for e in self._revocations if e.expires_at is None or e.expires_at > now]
        pruned = len(self._revocations) - len(kept)
        self._revocations = kept
        return pruned

    async def get_signal_cursor(self, receiver: str) -> int | None:
        return self._cursors.get(receiver)

    async def set_signal_cursor(
        self, receiver: str, seq: int, now: datetime, *, expected: int | None
    ) -> bool:
        codec.check_text(receiver=receiver)
        codec.utc(now)
        if self._cursors.get(receiver) != expected:
            return False
        self._cursors[receiver] = seq
        return True

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
        rows = [codec.audit_row(e) for e in events]  # all checked first
        chained = codec.chain_rows(rows, *await self.audit_head())
        encoded = [self._audit.encode(r) for r in chained]
        for row in encoded:
            self._audit.insert(str(row["seq"]), row)
        return [int(r["seq"]) for r in chained]

    async def audit_head(self) -> tuple[int, str]:
        rows = self._audit.rows()
        if not rows:
            return 0, audit.GENESIS
        last = max((r for _, r in rows), key=lambda r: r["seq"])
        return int(last["seq"]), str(last["hash"])

    async def list_chain(self, *, after: int = 0, limit: int = 1000) -> list[ChainRecord]:
        codec.check_audit_query(after, limit)
        rows = sorted(
            (r for _, r in self._audit.rows() if r["seq"] > after), key=lambda r: r["seq"]
        )
        return [codec.chain_record_from(self._audit.decode(r)) for r in rows[:limit]]

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        row = codec.checkpoint_row(checkpoint)
        _require_new(self._checkpoints, str(checkpoint.seq))
        self._checkpoints.insert(str(checkpoint.seq), row)

    async def list_checkpoints(self, *, after: int = -1, limit: int = 1000) -> list[Checkpoint]:
        rows = sorted(
            (r for _, r in self._checkpoints.rows() if r["seq"] > after), key=lambda r: r["seq"]
        )
        return [codec.checkpoint_from(r) for r in rows[:limit]]

    async def delete_audit_through(self, seq: int) -> int:
        head, _ = await self.audit_head()
        if seq >= head:
            raise ValueError("the head of the chain is never archived away")
        if str(seq) not in self._checkpoints:
            raise ValueError(f"no checkpoint pins record {seq}: take one first")
        doomed = [k for k, r in self._audit.rows() if r["seq"] <= seq]
        for key in doomed:
            self._audit.delete(key)
        return len(doomed)

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
        wanted = {
            "task": task,
            "agent": agent,
            "owner": owner,
            "decision": decision,
            "exception_id": exception,
            "tool": tool,
            "txn": txn,
        }
        start = None if since is None else codec.utc(since)
        end = None if until is None else codec.utc(until)
        rows = [
            r
            for _, r in self._audit.rows()
            if (descending or r["seq"] > after)
            and all(v is None or r[k] == v for k, v in wanted.items())
            and (start is None or r["time"] >= start)
            and (end is None or r["time"] < end)
        ]
        rows.sort(key=lambda r: r["seq"], reverse=descending)
        return _decoded(self._audit, rows[:limit], codec.audit_from)

    def _gateway_calls(self, since: datetime, until: datetime) -> Iterator[Row]:
        start, end = codec.utc(since), codec.utc(until)
        for _, r in self._audit.rows():
            if r["event"] == GATEWAY_CALL and start <= r["time"] < end:
                yield r

    async def audit_usage(self, *, since: datetime, until: datetime) -> list[UsageRow]:
        groups: dict[tuple[Any, ...], tuple[int, datetime]] = {}
        for r in self._gateway_calls(since, until):
            key: tuple[Any, ...] = (r["agent"], r["owner"], r["task"], r["tool"], r["action"])
            key += (r["tier"], r["decision"])
            calls, last = groups.get(key, (0, r["time"]))
            groups[key] = (calls + 1, max(last, r["time"]))
        return [
            UsageRow(
                agent=k[0],
                owner=k[1],
                task=k[2],
                tool=k[3],
                action=k[4],
                tier=k[5],
                decision=k[6],
                calls=calls,
                last_used=last,
            )
            for k, (calls, last) in groups.items()
        ]

    async def audit_timeline(
        self, *, since: datetime, until: datetime, agents: Sequence[str] | None = None
    ) -> list[TimelineRow]:
        counts: dict[tuple[str, str], int] = {}
        wanted = None if agents is None else set(agents)
        for r in self._gateway_calls(since, until):
            if wanted is not None and r["agent"] not in wanted:
                continue
            key = (r["time"].astimezone(UTC).strftime("%Y-%m-%d"), r["decision"])
            counts[key] = counts.get(key, 0) + 1
        return [TimelineRow(day, decision, n) for (day, decision), n in counts.items()]

    # --- approvals -------------------------------------------------------------------------

    def _open_approval(self, task_id: str, action_digest: str) -> tuple[str, Approval] | None:
        for key, r in self._approvals.rows():
            if (
                r["task_id"] == task_id
                and r["action_digest"] == action_digest
                and r["open_slot"] == codec.OPEN_SLOT
            ):
                return key, codec.approval_from(self._approvals.decode(r))
        return None

    def _store_approval(self, approval: Approval) -> None:
        self._approvals.update(
            approval.id, self._approvals.encode(codec.approval_changes(approval))
        )

    def _expire(self, approval: Approval) -> None:
        self._store_approval(replace(approval, state=ApprovalState.EXPIRED))

    async def request_approval(self, approval: Approval) -> Approval:
        codec.check_new_approval(approval)
        row = self._approvals.encode(codec.approval_row(approval))
        now = codec.utc(approval.created_at)
        _require_reference(self._tasks, approval.task_id)
        found = self._open_approval(approval.task_id, approval.action_digest)
        if found is not None and not due_to_expire(found[1], now):
            return found[1]
        _require_new(self._approvals, approval.id)
        if found is not None:
            self._expire(found[1])
        self._approvals.insert(approval.id, row)
        stored = await self.get_approval(approval.id)
        assert stored is not None
        return stored

    async def get_approval(self, approval_id: str) -> Approval | None:
        row = self._approvals.get(approval_id)
        return None if row is None else codec.approval_from(row)

    async def list_approvals(
        self,
        *,
        state: ApprovalState | None = None,
        task_id: str | None = None,
        limit: int = 100,
    ) -> list[Approval]:
        codec.check_approval_query(limit)
        wanted = None if state is None else ApprovalState(state).value
        rows = sorted(
            (
                r
                for _, r in self._approvals.rows()
                if (wanted is None or r["state"] == wanted)
                and (task_id is None or r["task_id"] == task_id)
            ),
            key=lambda r: (_Descending(r["created_at"]), r["id"]),
        )
        return _decoded(self._approvals, rows[:limit], codec.approval_from)

    async def list_approval_votes(self, approval_id: str) -> list[ApprovalVote]:
        rows = sorted(
            (r for _, r in self._votes.rows() if r["approval_id"] == approval_id),
            key=lambda r: (r["voted_at"], r["approver"]),
        )
        return _decoded(self._votes, rows, codec.vote_from)

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
        vote = self._votes.encode(
            codec.vote_row(ApprovalVote(approval_id, approver, approve, reason, now))
        )
        current = await self.get_approval(approval_id)
        if current is None:
            raise NotFound(internal=f"approvals: no row {approval_id!r}")
        voted = {r["approver"] for _, r in self._votes.rows() if r["approval_id"] == approval_id}
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
        except ApprovalExpired:
            if due_to_expire(current, now):
                self._expire(current)
            raise
        self._votes.insert(f"{approval_id}\x00{approver}", vote)
        self._store_approval(new)
        return new

    async def consume_approval(
        self, task_id: str, action_digest: str, now: datetime
    ) -> Approval | None:
        now = codec.utc(now)
        found = self._open_approval(task_id, action_digest)
        if found is None:
            return None
        approval = found[1]
        if approval.state is not ApprovalState.APPROVED or approval.use_by is None:
            return None
        if approval.use_by <= now:
            return None
        consumed = replace(approval, state=ApprovalState.CONSUMED, consumed_at=now)
        self._store_approval(consumed)
        return consumed

    async def expire_approvals(self, now: datetime) -> int:
        now = codec.utc(now)
        due = [
            a
            for a in (
                codec.approval_from(self._approvals.decode(r)) for _, r in self._approvals.rows()
            )
            if due_to_expire(a, now)
        ]
        for approval in due:
            self._expire(approval)
        return len(due)

    # The rules the SQL schema enforces with constraints, as checks run before any change.

    # --- break-glass exceptions -----------------------------------------------------------

    async def create_breakglass(self, bg: BreakGlass) -> None:
        codec.check_new_breakglass(bg)
        row = self._breakglass.encode(codec.breakglass_row(bg))
        _require_reference(self._agents, bg.agent_id)
        _require_new(self._breakglass, bg.id)
        self._breakglass.insert(bg.id, row)

    async def get_breakglass(self, bg_id: str) -> BreakGlass | None:
        row = self._breakglass.get(bg_id)  # decoded already
        return None if row is None else codec.breakglass_from(row)

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
        found = [
            codec.breakglass_from(self._breakglass.decode(r))
            for _, r in self._breakglass.rows()
            if agent_id is None or r["agent_id"] == agent_id
        ]
        found = [bg for bg in found if _breakglass_in(bg, state, now)]
        found.sort(key=lambda bg: (_Descending(bg.created_at), bg.id))
        return found[:limit]

    async def end_breakglass(
        self, bg_id: str, by: str, now: datetime, *, reason: str
    ) -> tuple[BreakGlass, int]:
        codec.check_text(by=by, reason=reason)
        now = codec.utc(now)
        current = await self.get_breakglass(bg_id)
        if current is None:
            raise NotFound(internal=f"breakglass: no row {bg_id!r}")
        ended = breakglass.end(current, by=by, now=now)
        row = self._breakglass.encode(codec.breakglass_row(ended))
        roots = [
            jti
            for jti, r in self._credentials.rows()
            if r["exception_id"] == bg_id and r["revoked_at"] is None and r["expires_at"] > now
        ]
        self._breakglass.update(bg_id, row)
        revoked = self._revoke_tree(roots, reason, now)
        self._log([codec.credential_entry(r, now, "breakglass", reason) for r in revoked])
        return ended, len(revoked)

    async def review_breakglass(
        self, bg_id: str, reviewer: str, note: str, now: datetime
    ) -> BreakGlass:
        codec.check_text(reviewer=reviewer, note=note)
        now = codec.utc(now)
        current = await self.get_breakglass(bg_id)
        if current is None:
            raise NotFound(internal=f"breakglass: no row {bg_id!r}")
        reviewed = breakglass.review(current, reviewer=reviewer, note=note, now=now)
        self._breakglass.update(bg_id, self._breakglass.encode(codec.breakglass_row(reviewed)))
        return reviewed

    async def count_overdue_breakglass(self, now: datetime, review_within: timedelta) -> int:
        now = codec.utc(now)
        return sum(
            1
            for _, r in self._breakglass.rows()
            if codec.breakglass_from(self._breakglass.decode(r)).overdue(now, review_within)
        )

    # --- web UI sign-in -------------------------------------------------------------------

    async def set_owner_password(self, owner_id: str, password_hash: str, now: datetime) -> None:
        codec.check_text(owner_id=owner_id, password_hash=password_hash)
        _require_reference(self._owners, owner_id)
        row = {"owner_id": owner_id, "password_hash": password_hash, "updated_at": codec.utc(now)}
        if owner_id in self._passwords:
            self._passwords.update(owner_id, row)
        else:
            self._passwords.insert(owner_id, row)
        for key, r in self._sessions.rows():
            if r["owner_id"] == owner_id:
                self._sessions.delete(key)

    async def get_owner_password(self, owner_id: str) -> str | None:
        row = self._passwords.get(owner_id)
        return None if row is None else str(row["password_hash"])

    async def create_session(self, session: UiSession) -> None:
        row = self._sessions.encode(codec.session_row(session))
        _require_reference(self._owners, session.owner_id)
        _require_new(self._sessions, session.id_hash)
        self._sessions.insert(session.id_hash, row)

    async def get_session(self, id_hash: str, now: datetime) -> UiSession | None:
        row = self._sessions.get(id_hash)
        if row is None or row["expires_at"] <= codec.utc(now):
            return None
        return codec.session_from(row)

    async def delete_session(self, id_hash: str) -> None:
        if id_hash in self._sessions:
            self._sessions.delete(id_hash)

    async def prune_sessions(self, now: datetime) -> int:
        now = codec.utc(now)
        due = [k for k, r in self._sessions.rows() if r["expires_at"] <= now]
        for key in due:
            self._sessions.delete(key)
        return len(due)


def _breakglass_in(bg: BreakGlass, state: str | None, now: datetime) -> bool:
    """Whether ``bg`` is in the ``list_breakglass`` state at ``now`` (any when None)."""
    if state == "active":
        return bg.active_at(now)
    if state == "review":
        return bg.needs_review(now)
    if state == "reviewed":
        return bg.reviewed_at is not None
    return True


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
