"""Break-glass exceptions (DESIGN.md §3 flow 9, docs/breakglass.md): an admin's temporary
widening of one agent's ceiling, flagged on every use, reviewed afterwards by someone else.

* :meth:`BreakGlassService.grant` checks the granter (an enabled owner with the ``admin``
  role), the agent (registered and active) and the scopes (registered tools offering the
  tier), then the rules of :func:`taskbound.core.breakglass.new_grant`: a justification,
  1–32 scopes beyond the ceiling, an expiry no later than ``breakglass.max_duration``.
* The exception then counts at task start, refresh and exchange (the grant decision adds
  its scopes; the credential names it in ``tb_exc`` and dies at its end), policy sees it
  as ``context.exception.active``, and every call made with such a credential carries its
  id in the audit (``exception_id``).
* It ends by itself at its expiry; an admin (or its granter) may end it early, which
  revokes every credential relying on it at once.
* Once ended it waits in the review queue until an owner with the ``reviewer`` role, not
  the granter, signs it off with a note; past ``breakglass.review_within`` it is overdue
  (``taskbound_breakglass_reviews_overdue`` on ``/metrics``).

Every grant, end, review and refused attempt is an audit record naming the exception
(events ``breakglass.granted|ended|reviewed|refused``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from taskbound.config import BreakGlassConfig
from taskbound.core import breakglass
from taskbound.core.breakglass import BreakGlass, BreakGlassRefused
from taskbound.core.clock import Clock
from taskbound.core.model import AgentState, AuditEvent, Owner, Role, Scope
from taskbound.errors import (
    BREAKGLASS_ERRORS,
    AgentNotActive,
    InvalidRequest,
    NotFound,
    RoleRequired,
    TaskboundError,
)
from taskbound.service.broker import new_id
from taskbound.storage.base import Storage
from taskbound.storage.pending import recorded

__all__ = ["BreakGlassService"]

log = logging.getLogger("taskbound.breakglass")

#: The most calls listed under one exception on its review page.
MAX_CALLS = 500


def _error(exc: BreakGlassRefused) -> TaskboundError:
    return BREAKGLASS_ERRORS[exc.code](exc.message)


class BreakGlassService:
    def __init__(
        self,
        config: BreakGlassConfig,
        storage: Storage,
        clock: Clock,
        *,
        after_revocation: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock
        self._after_revocation = after_revocation

    @property
    def max_duration(self) -> timedelta:
        return timedelta(seconds=self._config.max_duration_seconds)

    @property
    def review_within(self) -> timedelta:
        return timedelta(seconds=self._config.review_within_seconds)

    # --- transitions ---------------------------------------------------------------------

    async def grant(
        self,
        *,
        agent_id: str,
        scopes: Sequence[Scope],
        justification: str,
        granted_by: str,
        expires_at: datetime | None = None,
        cause: str,
    ) -> BreakGlass:
        """A new exception for ``agent_id``, granted by the owner ``granted_by`` (admin
        role). Without ``expires_at`` it lasts ``breakglass.default_duration``."""
        now = self._clock.now()
        subject = f"break-glass for {agent_id[:200]!r}"
        try:
            await self._person(granted_by, Role.ADMIN, "grant break-glass exceptions")
            agent = await self._storage.get_agent(agent_id)
            if agent is None:
                raise NotFound("no such agent", internal=f"no agent {agent_id!r}")
            if agent.state is not AgentState.ACTIVE:
                raise AgentNotActive(
                    f"the agent is {agent.state.value}: it cannot use an exception"
                )
            tools = {t.id: t for t in await self._storage.list_tools()}
            for scope in scopes:
                tool = tools.get(scope.tool)
                if tool is None or not tool.actions_of(scope.tier):
                    raise InvalidRequest(
                        f"{scope.tool}:{scope.tier.value} is not a registered tool tier"
                    )
            expiry = expires_at or now + timedelta(seconds=self._config.default_duration_seconds)
            try:
                bg = breakglass.new_grant(
                    id=new_id("bg"),
                    agent=agent,
                    scopes=scopes,
                    justification=justification,
                    granted_by=granted_by,
                    now=now,
                    expires_at=expiry,
                    max_duration=self.max_duration,
                    min_justification=self._config.min_justification,
                )
            except BreakGlassRefused as exc:
                raise _error(exc) from None
            granted = self._event(
                bg,
                "breakglass.granted",
                "allow",
                None,
                f"{bg.id} granted by {granted_by} ({cause}) until {bg.expires_at.isoformat()}: "
                f"{breakglass.label(bg.scopes)}; justification: {bg.justification}",
                owner=agent.owner_id,
            )
            # The exception exists only with its record: both land, or neither.
            async with recorded(self._storage, granted):
                await self._storage.create_breakglass(bg)
        except TaskboundError as err:
            await self._refused(None, "grant", subject, granted_by, cause, err, agent=agent_id)
            raise
        log.warning(
            "break-glass granted",
            extra={
                "event": "breakglass.granted",
                "breakglass_id": bg.id,
                "agent": bg.agent_id,
                "granted_by": granted_by,
                "scopes": breakglass.label(bg.scopes),
                "expires_at": bg.expires_at.isoformat(),
            },
        )
        return bg

    async def end(self, bg_id: str, *, by: str, reason: str, cause: str) -> tuple[BreakGlass, int]:
        """End an exception early (its granter or an admin); every credential relying on
        it is revoked in the same transaction. Returns it and how many were revoked."""
        current = await self._storage.get_breakglass(bg_id)
        try:
            if current is None:
                raise NotFound("no such break-glass exception")
            person = await self._person(by, None, "end break-glass exceptions")
            if by != current.granted_by and Role.ADMIN not in person.roles:
                raise RoleRequired(
                    internal=f"owner {by!r} is neither the granter nor an admin",
                )
            why = reason.strip() or "break-glass exception ended early"
            try:
                ended, revoked = await self._storage.end_breakglass(
                    bg_id, by, self._clock.now(), reason=why[:1000]
                )
            except BreakGlassRefused as exc:
                raise _error(exc) from None
        except TaskboundError as err:
            await self._refused(current, "end", bg_id, by, cause, err)
            raise
        if revoked and self._after_revocation is not None:
            # This process's gateway has it at once; if that fails, its feed catches up.
            try:
                await self._after_revocation()
            except Exception:
                log.exception("revocation feed sync after a break-glass end failed")
        await self._audit(
            ended,
            "breakglass.ended",
            "info",
            None,
            f"{ended.id} ended early by {by} ({cause}); {revoked} credential(s) revoked; "
            f"reason: {why}",
        )
        return ended, revoked

    async def review(self, bg_id: str, *, reviewer: str, note: str, cause: str) -> BreakGlass:
        """Sign off an ended exception: a reviewer who is not its granter, with a note."""
        current = await self._storage.get_breakglass(bg_id)
        try:
            if current is None:
                raise NotFound("no such break-glass exception")
            await self._person(reviewer, Role.REVIEWER, "review break-glass exceptions")
            try:
                reviewed = await self._storage.review_breakglass(
                    bg_id, reviewer, note[:4000], self._clock.now()
                )
            except BreakGlassRefused as exc:
                raise _error(exc) from None
        except TaskboundError as err:
            await self._refused(current, "review", bg_id, reviewer, cause, err)
            raise
        await self._audit(
            reviewed,
            "breakglass.reviewed",
            "info",
            None,
            f"{reviewed.id} reviewed by {reviewer} ({cause}): {reviewed.review_note}",
        )
        return reviewed

    # --- reading -------------------------------------------------------------------------

    async def get(self, bg_id: str) -> BreakGlass:
        found = await self._storage.get_breakglass(bg_id)
        if found is None:
            raise NotFound("no such break-glass exception")
        return found

    async def find(
        self, *, state: str | None = None, agent_id: str | None = None, limit: int = 100
    ) -> list[BreakGlass]:
        if state is not None and state not in ("active", "review", "overdue", "reviewed"):
            raise InvalidRequest("state must be active, review, overdue or reviewed")
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000")
        now = self._clock.now()
        if state == "overdue":
            # The review queue, only those waiting too long (a queue is short: read it all).
            queue = await self._storage.list_breakglass(
                now=now, state="review", agent_id=agent_id, limit=1000
            )
            return [bg for bg in queue if bg.overdue(now, self.review_within)][:limit]
        return await self._storage.list_breakglass(
            now=now, state=state, agent_id=agent_id, limit=limit
        )

    async def calls(self, bg_id: str, limit: int = MAX_CALLS) -> list[tuple[int, AuditEvent]]:
        """Every audit record made under the exception (its calls, exchanges and its own
        grant, end and review), oldest first, at most ``limit``."""
        return await self._storage.list_audit(exception=bg_id, limit=limit)

    async def overdue(self) -> int:
        return await self._storage.count_overdue_breakglass(self._clock.now(), self.review_within)

    def state_of(self, bg: BreakGlass) -> str:
        """``active``, ``overdue`` (waiting for review too long), ``review`` or
        ``reviewed``, as of now."""
        now = self._clock.now()
        if bg.reviewed_at is not None:
            return "reviewed"
        if bg.active_at(now):
            return "active"
        return "overdue" if bg.overdue(now, self.review_within) else "review"

    # --- people and audit ----------------------------------------------------------------

    async def _person(self, owner_id: str, role: Role | None, what: str) -> Owner:
        owner = await self._storage.get_owner(owner_id) if owner_id else None
        if owner is None or owner.disabled:
            raise RoleRequired(internal=f"owner {owner_id[:200]!r} is unknown or disabled")
        if role is not None and role not in owner.roles:
            raise RoleRequired(
                f"the {role.value} role is needed to {what}",
                internal=f"owner {owner_id!r} lacks the {role.value} role",
            )
        return owner

    async def _audit(
        self,
        bg: BreakGlass,
        event: str,
        decision: str,
        code: str | None,
        detail: str,
        *,
        owner: str | None = None,
    ) -> None:
        if owner is None:
            agent = await self._storage.get_agent(bg.agent_id)
            owner = agent.owner_id if agent is not None else None
        await self._storage.append_audit(
            self._event(bg, event, decision, code, detail, owner=owner)
        )

    def _event(
        self,
        bg: BreakGlass,
        event: str,
        decision: str,
        code: str | None,
        detail: str,
        *,
        owner: str | None,
    ) -> AuditEvent:
        return AuditEvent(
            time=self._clock.now(),
            event=event,
            decision=decision,
            code=code,
            agent=bg.agent_id,
            owner=owner,
            detail=detail,
            exception_id=bg.id,
        )

    async def _refused(
        self,
        bg: BreakGlass | None,
        verb: str,
        subject: str,
        person: str,
        cause: str,
        err: TaskboundError,
        *,
        agent: str | None = None,
    ) -> None:
        detail = (
            f"{verb} of {subject[:200]} by owner {person[:200]!r} ({cause}) refused: {err.internal}"
        )
        log.warning(
            "break-glass refused",
            extra={"event": "breakglass.refused", "verb": verb, "code": err.code},
        )
        await self._storage.append_audit(
            AuditEvent(
                time=self._clock.now(),
                event="breakglass.refused",
                decision="deny",
                code=err.code,
                agent=bg.agent_id if bg is not None else (agent or None),
                detail=detail,
                exception_id=bg.id if bg is not None else None,
            )
        )
