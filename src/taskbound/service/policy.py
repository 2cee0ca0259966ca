"""The policy store and the decision points wired to live data (DESIGN.md §5).

Policies are `*.cedar` files in a directory, validated against a schema generated from the
registry before they are used. A reload — asked by the CLI, the admin API, or noticed on a
file change — swaps in the new set only when all of it compiles; otherwise the last good
set stays in force and the reload says why. A change of the registry's tools (which changes
the schema) recompiles the same sources the same way.

Every reload is an audit record: ``policy.reloaded`` with the new version, or
``policy.reload_refused`` (decision ``error``) with the problems. A new set is swapped in
only once its record is durable: when the record cannot be written the reload fails, the
last good set stays in force, and a file watcher tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from taskbound.config import Settings
from taskbound.core.cedar_schema import TaskFacts, build_schema, registry_entities
from taskbound.core.clock import Clock
from taskbound.core.decisions import (
    Situation,
    action_info,
    build_context,
    decide_action,
    decision_entities,
    denied,
)
from taskbound.core.grant import CeilingDecider, GrantDecision, GrantRequest
from taskbound.core.model import Agent, Owner, ScopeDenial, ScopeGrant, Task, Tool
from taskbound.core.policy import (
    CompiledPolicies,
    Decision,
    EntitySet,
    Outcome,
    PolicyInvalid,
    PolicySource,
    compile_policies,
)
from taskbound.errors import TaskboundError
from taskbound.service.audit_records import change_event, listing
from taskbound.storage.base import Storage

log = logging.getLogger("taskbound.policy")

MAX_POLICY_FILES = 500
MAX_POLICY_FILE_BYTES = 1024 * 1024


def default_policy_dir() -> Path:
    """The default pack shipped with taskbound."""
    return Path(str(resources.files("taskbound.policies") / "default"))


def read_policy_dir(directory: Path) -> list[PolicySource]:
    """Every `*.cedar` file directly in ``directory``, by name. Bounded in count and size."""
    if not directory.is_dir():
        raise PolicyInvalid(f"policy directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix == ".cedar" and p.is_file())
    if len(files) > MAX_POLICY_FILES:
        raise PolicyInvalid(f"more than {MAX_POLICY_FILES} policy files in {directory}")
    sources = []
    for path in files:
        if path.stat().st_size > MAX_POLICY_FILE_BYTES:
            raise PolicyInvalid(f"{path.name} is larger than {MAX_POLICY_FILE_BYTES} bytes")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PolicyInvalid(f"{path.name} is not UTF-8 text") from None
        sources.append(PolicySource(path.name, text))
    return sources


def _dir_fingerprint(directory: Path) -> str:
    """Names, sizes and modification times of the policy files: cheap change detection."""
    digest = hashlib.sha256()
    with contextlib.suppress(OSError):
        for p in sorted(directory.iterdir()):
            if p.suffix == ".cedar":
                st = p.stat()
                digest.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _tools_fingerprint(tools: Sequence[Tool]) -> str:
    return hashlib.sha256(
        repr(sorted((t.id, t.updated_at, t.actions) for t in tools)).encode()
    ).hexdigest()


@dataclass(frozen=True, slots=True)
class PolicyState:
    """One consistent generation: compiled policies, the schema they were checked against,
    and the registry entities built for that schema."""

    compiled: CompiledPolicies
    base: EntitySet
    tools_fingerprint: str
    loaded_at: datetime


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    version: str
    changed: bool
    problems: tuple[str, ...] = ()


@dataclass(slots=True)
class _EntityCache:
    """Per-task entity sets for call decisions, so the task's entities are parsed once
    rather than on every call. Keyed by everything they are built from."""

    size: int = 4096
    items: OrderedDict[tuple[Any, ...], EntitySet] = field(default_factory=OrderedDict)

    def get(self, key: tuple[Any, ...]) -> EntitySet | None:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
        return found

    def put(self, key: tuple[Any, ...], value: EntitySet) -> None:
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)


class PolicyEngine:
    def __init__(self, settings: Settings, storage: Storage, clock: Clock) -> None:
        self._settings = settings
        self._storage = storage
        self._clock = clock
        self._dir = settings.policy.dir or default_policy_dir()
        self._state: PolicyState | None = None
        self._sources: list[PolicySource] = []
        self._dir_seen = ""
        self._last_problems: tuple[str, ...] = ()
        # The registry state whose recompile was last refused (recorded once, not per sweep).
        self._refused_tools = ""
        self._lock = asyncio.Lock()
        self._cache = _EntityCache()

    # --- loading -----------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def state(self) -> PolicyState:
        if self._state is None:
            raise TaskboundError(internal="policies not loaded")
        return self._state

    @property
    def sources(self) -> tuple[PolicySource, ...]:
        """The policy files of the set in force (not the directory's current files, which
        may hold a change that was refused)."""
        return tuple(self._sources)

    @property
    def last_problems(self) -> tuple[str, ...]:
        """Why the last reload or recompile was refused; empty when it succeeded."""
        return self._last_problems

    async def load(self) -> None:
        """The first load: an invalid set here is a start-up error, never a silent deny-all."""
        result = await self.reload("start-up")
        if not result.ok:
            raise PolicyInvalid("the policies do not compile:\n  " + "\n  ".join(result.problems))

    async def _compile(self, sources: list[PolicySource], tools: list[Tool]) -> PolicyState:
        schema = build_schema(tools)
        compiled = compile_policies(sources, schema)
        base = EntitySet.build(registry_entities([], [], tools), schema)
        return PolicyState(compiled, base, _tools_fingerprint(tools), self._clock.now())

    async def reload(self, cause: str) -> ReloadResult:
        """Re-read the directory and swap the new set in if all of it compiles; otherwise
        keep the last good set and report every problem."""
        async with self._lock:
            fingerprint = _dir_fingerprint(self._dir)
            try:
                sources = await asyncio.to_thread(read_policy_dir, self._dir)
                state = await self._compile(sources, await self._storage.list_tools())
            except PolicyInvalid as exc:
                problems = tuple(str(p) for p in exc.problems) or (exc.detail,)
                log.error(
                    "policy reload refused; the last good set stays in force",
                    extra={
                        "event": "policy.reload_failed",
                        "cause": cause,
                        "problems": list(problems),
                        "version": self._state.compiled.version if self._state else None,
                    },
                )
                await self._record_refused(problems, exc.code, cause)
                self._last_problems = problems
                self._dir_seen = fingerprint
                version = self._state.compiled.version if self._state else ""
                return ReloadResult(False, version, False, problems)
            old = self._state.compiled.version if self._state else None
            changed = old != state.compiled.version
            await self._record_loaded(state, old, len(sources), cause)
            self._state, self._sources, self._dir_seen = state, sources, fingerprint
            self._last_problems = ()
            self._cache = _EntityCache()
            log.info(
                "policies loaded",
                extra={
                    "event": "policy.loaded",
                    "cause": cause,
                    "version": state.compiled.version,
                    "policies": len(state.compiled.policies),
                    "changed": changed,
                },
            )
            return ReloadResult(True, state.compiled.version, changed)

    async def refresh_registry(self) -> None:
        """Recompile when the registry's tools changed (the schema follows them). A new
        version is a ``policy.reloaded`` record (cause ``registry change``), swapped in
        once the record is durable; a set that no longer compiles is one
        ``policy.reload_refused`` record per state of the registry (this runs every sweep)."""
        tools = await self._storage.list_tools()
        fingerprint = _tools_fingerprint(tools)
        if self._state is not None and fingerprint == self._state.tools_fingerprint:
            return
        async with self._lock:
            try:
                state = await self._compile(self._sources, tools)
            except PolicyInvalid as exc:
                problems = tuple(str(p) for p in exc.problems) or (exc.detail,)
                log.error(
                    "the policies do not compile against the changed registry; the last good "
                    "set stays in force (new tools are denied until this is fixed)",
                    extra={"event": "policy.registry_refresh_failed", "problems": list(problems)},
                )
                if fingerprint != self._refused_tools:
                    await self._record_refused(problems, exc.code, "registry change")
                    self._refused_tools = fingerprint
                self._last_problems = problems
                return
            old = self._state.compiled.version if self._state else None
            if old != state.compiled.version:
                await self._record_loaded(state, old, len(self._sources), "registry change")
            self._state, self._cache = state, _EntityCache()
            log.info(
                "policies recompiled for the registry", extra={"version": state.compiled.version}
            )

    async def _record_loaded(
        self, state: PolicyState, old: str | None, files: int, cause: str
    ) -> None:
        new = state.compiled.version
        await self._storage.append_audit(
            change_event(
                self._clock,
                "policy.reloaded",
                f"policy set {new} in force: {len(state.compiled.policies)} policies from "
                f"{files} file(s); "
                + (
                    "first load"
                    if old is None
                    else f"replaces {old}"
                    if old != new
                    else "unchanged"
                ),
                cause=cause,
                policy_version=new,
            )
        )

    async def _record_refused(self, problems: tuple[str, ...], code: str, cause: str) -> None:
        await self._storage.append_audit(
            change_event(
                self._clock,
                "policy.reload_refused",
                f"policy reload refused, the last good set stays in force: {len(problems)} "
                f"problem(s): {listing(problems, 10, each=300)}",
                cause=cause,
                decision="error",
                code=code,
                policy_version=self._state.compiled.version if self._state else None,
            )
        )

    async def watch(self, interval: float) -> None:
        """Reload whenever the policy files change (polling: portable, and cheap)."""
        while True:
            await asyncio.sleep(interval)
            try:
                if _dir_fingerprint(self._dir) != self._dir_seen:
                    await self.reload("file change")
            except Exception:
                log.exception("policy watcher failed; retrying")

    def status(self) -> dict[str, Any]:
        state = self._state
        return {
            "directory": str(self._dir),
            "version": state.compiled.version if state else None,
            "schema_version": state.compiled.schema.version if state else None,
            "loaded_at": state.loaded_at.isoformat() if state else None,
            "last_problems": list(self._last_problems),
            "policies": [
                {
                    "id": p.id,
                    "file": p.file,
                    "line": p.line,
                    "effect": p.effect,
                    "annotations": dict(p.annotations),
                }
                for p in (state.compiled.policies.values() if state else ())
            ],
        }

    # --- decision points ---------------------------------------------------------------

    def grant_decider(self) -> CedarGrantDecider:
        return CedarGrantDecider(self, self._settings.policy.environment)

    def decide_call(
        self,
        *,
        agent: Agent,
        owner: Owner,
        task: Task,
        tool: Tool,
        action_name: str,
        arguments: dict[str, Any] | None,
        target: str | None,
        situation: Situation,
        variant: str | None = None,
        others: tuple[Agent, ...] = (),
        other_owners: tuple[Owner, ...] = (),
    ) -> Decision:
        """The call decision for the gateway: may this task's credential perform this
        action, with these arguments, on this resource, now? Anything that cannot be
        decided is a deny with the reason. ``variant`` names a view of the task that
        differs from the stored one (a delegated credential's narrowed constraints), so
        that its entities are cached apart; ``others`` and ``other_owners`` are the further
        agents and owners its entities need (the task's agent and the delegate's owner)."""
        state = self.state
        compiled = state.compiled
        info = action_info(compiled, tool.id, action_name)
        if info is None:
            return denied(compiled, f"{tool.id}:{action_name} is not in the policy schema")
        facts = TaskFacts(
            task.id, task.agent_id, task.owner_id, task.purpose, task.constraints, task.state.value
        )
        key = (
            compiled.version,
            task.id,
            task.state,
            agent.spiffe_id,
            agent.state,
            agent.updated_at,
            owner.id,
            owner.disabled,
            owner.updated_at,
            variant,
            tuple((a.spiffe_id, a.state, a.updated_at) for a in others),
            tuple((o.id, o.disabled, o.updated_at) for o in other_owners),
        )
        entities = self._cache.get(key)
        if entities is None:
            entities = state.base.with_entities(
                decision_entities(agent, [owner, *other_owners], facts, others)
            )
            self._cache.put(key, entities)
        try:
            context = build_context(
                info, facts, "call", situation, target=target, arguments=arguments
            )
        except TaskboundError as exc:
            return denied(compiled, exc.internal)
        return decide_action(
            compiled, entities, agent=agent, tool=tool, action=info, context=context
        )


class CedarGrantDecider:
    """The grant decision: the registry ceiling first (a hard bound policy cannot lift),
    then Cedar for every action of every scope the ceiling lets through. A scope keeps the
    actions policy allows; one with none left is denied with the deciding policies."""

    def __init__(self, engine: PolicyEngine, environment: str) -> None:
        self._engine = engine
        self._environment = environment
        self._ceiling = CeilingDecider()

    def decide(self, request: GrantRequest) -> GrantDecision:
        first = self._ceiling.decide(request)
        if first.refusal is not None or not first.granted:
            return first
        assert request.owner is not None
        state = self._engine.state
        compiled = state.compiled
        facts = TaskFacts(
            "pending",
            request.agent.spiffe_id,
            request.owner_id,
            request.purpose,
            request.constraints,
            "active",
        )
        owners = [request.owner, *request.other_owners]
        entities = state.base.with_entities(
            decision_entities(request.agent, owners, facts, request.others)
        )
        granted: list[ScopeGrant] = []
        refused: list[ScopeDenial] = list(first.denied)
        determining: set[str] = set()
        for scope in first.granted:
            tool = request.tools[scope.tool]
            # Policy sees whether this scope relies on a break-glass exception, its own or
            # (a delegation) the one its parent credential relies on.
            situation = Situation(
                now=request.now,
                environment=self._environment,
                delegation_depth=request.delegation_depth,
                exception_active=(
                    scope.exception is not None or request.inherited_exception is not None
                ),
            )
            allowed: list[str] = []
            reasons: list[str] = []
            for name in scope.actions:
                info = action_info(compiled, scope.tool, name)
                if info is None:
                    reasons.append(f"{name}: not in the policy schema")
                    continue
                context = build_context(info, facts, "grant", situation)
                decision = decide_action(
                    compiled, entities, agent=request.agent, tool=tool, action=info, context=context
                )
                if decision.outcome is Outcome.ALLOW:
                    allowed.append(name)
                    determining.update(decision.determining)
                else:
                    why = ", ".join(decision.determining) or "no policy permits it"
                    if decision.errors:
                        why += f" (errors: {'; '.join(decision.errors)})"
                    reasons.append(f"{name}: {decision.outcome.value} by {why}")
            if allowed:
                granted.append(ScopeGrant(scope.tool, scope.tier, tuple(allowed), scope.exception))
            else:
                refused.append(
                    ScopeDenial(scope.tool, scope.tier.value, "policy_denied", "; ".join(reasons))
                )
        return GrantDecision(
            tuple(granted),
            tuple(refused),
            determined_by=("registry-ceiling", compiled.version, *sorted(determining)),
        )
