"""Audit records of lifecycle and administrative changes: tasks started and ended,
credentials issued and revoked, registry, signing-key and admin-token changes, policy
reloads (events ``task.*``, ``credential.*``, ``admin.*``, ``policy.*``).

A service writes the record of a change before the method that made it returns, and the
API answers only after that: when the record cannot be written the store's error
(``storage_unavailable``) propagates and the request fails. The change is committed by the
store in its own transaction first, so such a failure can leave a change without its
record; each caller says what it does about that (a task's credentials are never handed
out, a policy set is swapped in only once its record is durable).

``detail`` says who caused the change and never carries a secret. Text that comes from
callers (reasons, descriptions, policy problems) is clipped and stripped of control
characters, so a record stays small whatever it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from taskbound.core.clock import Clock
from taskbound.core.model import AuditEvent
from taskbound.storage.base import AuditStore

__all__ = ["INFO", "clip", "listing", "record_change"]

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


async def record_change(
    store: AuditStore,
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
) -> None:
    """Append the record of one change made by ``cause`` (``admin:<token id>``,
    ``signal:<name>``, ``system``…); durable when this returns, raises when it is not."""
    await store.append_audit(
        AuditEvent(
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
    )
