"""Break-glass exceptions (issue 7): an admin's temporary widening of one agent's ceiling.

An exception names the (tool, tier) scopes it adds beyond the agent's ceiling, a mandatory
justification, who granted it and an expiry no later than a configured hard maximum. Its
life::

    active --now >= expires_at--------------> ended (by itself)
    active --end(by, now)-------------------> ended (early)
    ended  --review(reviewer != granter)----> reviewed

An exception is active from ``created_at`` until the earlier of ``expires_at`` and
``ended_at`` (both exclusive). Once it has ended it waits in the review queue until a
reviewer other than the granter signs it off; :meth:`BreakGlass.overdue` says when it has
waited too long. Policy and the audit learn which exception a call relies on from
:func:`relied_on`; the ceiling in force is :func:`effective_ceiling`.

Pure: no I/O, no clock; ``now`` is a parameter. Refusals raise :class:`BreakGlassRefused`
with a stable ``code`` the callers map to an error and audit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

from taskbound.core.model import Agent, Scope

__all__ = [
    "MAX_SCOPES",
    "MIN_JUSTIFICATION",
    "BreakGlass",
    "BreakGlassRefused",
    "effective_ceiling",
    "end",
    "label",
    "new_grant",
    "relied_on",
    "review",
]

#: The most scopes one exception may add: a break-glass is narrow by design.
MAX_SCOPES: Final = 32
#: The shortest justification (characters, surrounding whitespace not counted) by default.
MIN_JUSTIFICATION: Final = 20


@dataclass(frozen=True, slots=True)
class BreakGlass:
    """One break-glass exception: ``scopes`` beyond agent ``agent_id``'s ceiling, granted
    by ``granted_by`` at ``created_at`` until ``expires_at`` (or an earlier ``ended_at``),
    then reviewed by someone else."""

    id: str
    agent_id: str  # the agent's SPIFFE ID
    scopes: frozenset[Scope]
    justification: str
    granted_by: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None = None  # set only by an early end
    ended_by: str | None = None
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None
    review_note: str | None = None

    def ended_at_or_expiry(self) -> datetime:
        """When it stops (or stopped) counting: the early end if any and earlier, else the
        expiry."""
        if self.ended_at is not None and self.ended_at < self.expires_at:
            return self.ended_at
        return self.expires_at

    def active_at(self, now: datetime) -> bool:
        """Whether calls at ``now`` may rely on it: granted at or before ``now``, and
        ``now`` strictly before its end (at the expiry instant it is no longer active)."""
        return self.created_at <= now < self.ended_at_or_expiry()

    def needs_review(self, now: datetime) -> bool:
        """Whether it sits in the review queue at ``now``: ended (early or by expiry) and
        not yet reviewed."""
        return self.reviewed_at is None and now >= self.ended_at_or_expiry()

    def overdue(self, now: datetime, review_within: timedelta) -> bool:
        """Whether its review is overdue at ``now``: it needs review and ``review_within``
        has passed since it ended (at the deadline instant it is overdue)."""
        return self.needs_review(now) and now >= self.ended_at_or_expiry() + review_within


class BreakGlassRefused(Exception):
    """A break-glass request or transition refused, with a stable ``code``.

    Codes: ``justification_required``, ``justification_too_short``, ``no_scopes``,
    ``too_many_scopes``, ``already_in_ceiling``, ``expiry_in_past``, ``expiry_too_long``,
    ``already_ended``, ``not_ended``, ``already_reviewed``, ``self_review_not_allowed``,
    ``review_note_required``.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)

    def __repr__(self) -> str:
        return f"BreakGlassRefused(code={self.code!r}, message={self.message!r})"


def _require_aware(name: str, when: datetime) -> None:
    # Comparing naive and aware times raises deep inside; say which argument is wrong.
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def label(scopes: Iterable[Scope]) -> str:
    """``tool:tier, …`` in a stable order, for messages and pages."""
    return ", ".join(f"{s.tool}:{s.tier.value}" for s in sorted(scopes))


def new_grant(
    *,
    id: str,
    agent: Agent,
    scopes: Iterable[Scope],
    justification: str,
    granted_by: str,
    now: datetime,
    expires_at: datetime,
    max_duration: timedelta,
    min_justification: int = MIN_JUSTIFICATION,
) -> BreakGlass:
    """A new exception for ``agent``, granted by ``granted_by`` at ``now``.

    Refused (:class:`BreakGlassRefused`) unless the justification, stripped, is at least
    ``min_justification`` characters; there are 1 to :data:`MAX_SCOPES` scopes, none of
    them already within the agent's ceiling (it would be pointless, and would be flagged
    in the audit for nothing); and ``now < expires_at <= now + max_duration``.
    Raises :class:`ValueError` for caller errors (empty ids, a non-positive maximum, naive
    times).
    """
    if not id or not granted_by:
        raise ValueError("id and granted_by must be non-empty")
    if max_duration <= timedelta(0):
        raise ValueError("max_duration must be positive")
    if min_justification < 1:
        raise ValueError("min_justification must be at least 1")
    _require_aware("now", now)
    _require_aware("expires_at", expires_at)

    text = justification.strip()
    if not text:
        raise BreakGlassRefused("justification_required", "a justification is required")
    if len(text) < min_justification:
        raise BreakGlassRefused(
            "justification_too_short",
            f"the justification must be at least {min_justification} characters",
        )
    wanted = frozenset(scopes)
    if not wanted:
        raise BreakGlassRefused("no_scopes", "a break-glass exception needs at least one scope")
    if len(wanted) > MAX_SCOPES:
        raise BreakGlassRefused(
            "too_many_scopes", f"at most {MAX_SCOPES} scopes per exception, not {len(wanted)}"
        )
    covered = wanted & agent.ceiling
    if covered:
        raise BreakGlassRefused(
            "already_in_ceiling",
            f"already within the agent's ceiling: {label(covered)}",
        )
    if expires_at <= now:
        raise BreakGlassRefused("expiry_in_past", "the expiry must be after now")
    if expires_at > now + max_duration:
        raise BreakGlassRefused(
            "expiry_too_long", f"the expiry may be at most {max_duration} from now"
        )
    return BreakGlass(
        id=id,
        agent_id=agent.spiffe_id,
        scopes=wanted,
        justification=text,
        granted_by=granted_by,
        created_at=now,
        expires_at=expires_at,
    )


def _reliance(
    agent: Agent, exceptions: Iterable[BreakGlass], now: datetime
) -> dict[Scope, BreakGlass]:
    """For each scope beyond ``agent``'s ceiling that an active exception of that agent
    adds, the exception it relies on: the one that ends last (ties: the greatest id), so
    an early end of a shorter one never takes the scope away while another still holds."""
    chosen: dict[Scope, BreakGlass] = {}
    for bg in exceptions:
        # An exception for another agent never widens this one, whatever the caller passed.
        if bg.agent_id != agent.spiffe_id or not bg.active_at(now):
            continue
        for scope in bg.scopes - agent.ceiling:
            held = chosen.get(scope)
            if held is None or (bg.ended_at_or_expiry(), bg.id) > (
                held.ended_at_or_expiry(),
                held.id,
            ):
                chosen[scope] = bg
    return chosen


def effective_ceiling(
    agent: Agent, exceptions: Iterable[BreakGlass], now: datetime
) -> tuple[frozenset[Scope], dict[Scope, str]]:
    """The ceiling in force for ``agent`` at ``now``: its own ceiling plus the scopes of its
    active exceptions, and for each scope added, the id of the exception it relies on."""
    chosen = _reliance(agent, exceptions, now)
    return agent.ceiling | frozenset(chosen), {s: bg.id for s, bg in chosen.items()}


def relied_on(
    agent: Agent, scope: Scope, exceptions: Iterable[BreakGlass], now: datetime
) -> BreakGlass | None:
    """The active exception a call or grant of ``scope`` by ``agent`` at ``now`` relies on;
    None when the agent's own ceiling covers it, or when nothing does."""
    if scope in agent.ceiling:
        return None
    return _reliance(agent, exceptions, now).get(scope)


def end(bg: BreakGlass, *, by: str, now: datetime) -> BreakGlass:
    """``bg`` ended early by ``by`` at ``now``. Refused with ``already_ended`` when it has
    ended already, early or by its expiry."""
    if not by:
        raise ValueError("by must be non-empty")
    _require_aware("now", now)
    if bg.ended_at is not None:
        raise BreakGlassRefused(
            "already_ended", f"break-glass {bg.id} was ended at {bg.ended_at.isoformat()}"
        )
    if now >= bg.expires_at:
        raise BreakGlassRefused(
            "already_ended", f"break-glass {bg.id} expired at {bg.expires_at.isoformat()}"
        )
    if now < bg.created_at:
        raise ValueError("now is before the exception was granted")
    return replace(bg, ended_at=now, ended_by=by)


def review(bg: BreakGlass, *, reviewer: str, note: str, now: datetime) -> BreakGlass:
    """``bg`` signed off by ``reviewer`` at ``now`` with ``note``.

    Refused with ``already_reviewed`` after a review; ``not_ended`` while it can still be
    relied on; ``self_review_not_allowed`` when ``reviewer`` is the granter (the ids are
    compared exactly: they are canonical principal ids, not display names); and
    ``review_note_required`` for a blank note.
    """
    if not reviewer:
        raise ValueError("reviewer must be non-empty")
    _require_aware("now", now)
    if bg.reviewed_at is not None:
        raise BreakGlassRefused(
            "already_reviewed", f"break-glass {bg.id} was reviewed by {bg.reviewed_by}"
        )
    if not bg.needs_review(now):
        raise BreakGlassRefused(
            "not_ended", f"break-glass {bg.id} is in force until {bg.expires_at.isoformat()}"
        )
    if reviewer == bg.granted_by:
        raise BreakGlassRefused(
            "self_review_not_allowed", "the granter of an exception may not review it"
        )
    text = note.strip()
    if not text:
        raise BreakGlassRefused("review_note_required", "a review note is required")
    return replace(bg, reviewed_by=reviewer, reviewed_at=now, review_note=text)
