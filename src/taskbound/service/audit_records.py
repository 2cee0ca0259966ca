"""Audit records of lifecycle and administrative changes: tasks started and ended,
credentials issued and revoked, registry, signing-key and admin-token changes, policy
reloads (events ``task.*``, ``credential.*``, ``admin.*``, ``policy.*``).

A change that grants or alters authority (a registry entry created or updated, an admin
token created, a signing key rotated, a task started, a credential issued, a break-glass
exception granted) commits together with its record, in one transaction
(:func:`taskbound.storage.pending.recorded`): when the record cannot be written the change
does not happen and the request fails (``storage_unavailable``). A change that only takes
authority away (an end, a revocation, a suspension, an expiry) and whose record depends on
what the store found is committed first and recorded right after, before the method
returns: should that record fail, the request fails, and the authority is gone anyway.
A policy set is swapped in only once its record is durable.

``detail`` says who caused the change and never carries a secret. Text that comes from
callers (reasons, descriptions, policy problems) is clipped and stripped of control
characters, so a record stays small whatever it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from taskbound.core.clock import Clock
from taskbound.core.model import AuditEvent

__all__ = ["INFO", "change_event", "clip", "listing"]

#: The decision of a record that reports a change rather than decides a request.
INFO: Final = "info"
#: The longest piece of caller-supplied text a record keeps.
TEXT_MAX: Final = 200
#: The most items of a list a record names (the rest are counted).
LIST_MAX: Final = 20


def clip(text: str, limit: int = TEXT_MAX) -> str:
    """``text`` on one line, without control characters (a store refuses NUL), at most
    ``limit`` characters."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def listing(items: Iterable[str], limit: int = LIST_MAX, *, each: int = 100) -> str:
    """``a, b, c (+n more)``, each item clipped; ``none`` for nothing."""
    items = list(items)
    shown = ", ".join(clip(item, each) for item in items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown or "none"


def change_event(
    clock: Clock,
    event: str,
    detail: str,
    *,
    cause: str,
    decision: str = INFO,
    code: str | None = None,
    agent: str | None = None,
    owner: str | None = None,
    tool: str | None = None,
    policy_version: str | None = None,
) -> AuditEvent:
    """The record of one change made by ``cause`` (``admin:<token id>``, ``signal:<name>``,
    ``system``…)."""
    return AuditEvent(
        time=clock.now(),
        event=event,
        decision=decision,
        code=code,
        agent=agent,
        owner=owner,
        tool=tool,
        policy_version=policy_version,
        detail=f"{detail} (by {clip(cause)})",
    )
