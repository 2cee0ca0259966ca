"""Audit records that commit with the change they record.

A service that changes authority (registers an agent, rotates a key, starts a task…) wraps
the store call in :func:`recorded`::

    async with recorded(storage, event):
        await storage.create_agent(agent)

The SQL stores append the waiting records inside the first write transaction the block
commits, in the change's own transaction, under the chain's lock: the change and its record
land together or not at all, and an audit store that fails makes the change fail too. A
store that commits no write transaction in the block (the in-memory store, or a method that
found nothing to write) leaves the records to :func:`recorded`, which appends them on their
own once the block has returned; when the block raises, nothing more is written.

The records wait in a context variable bound to the task that opened the block: a task
started inside it (the audit writer, say) inherits the variable but never takes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from taskbound.core.model import AuditEvent
from taskbound.storage import codec
from taskbound.storage.base import AuditStore

__all__ = ["Pending", "claim", "recorded"]


@dataclass(eq=False, slots=True)
class Pending:
    """Records waiting for the block's first write transaction to commit."""

    events: tuple[AuditEvent, ...]
    owner: asyncio.Task[object] | None
    claimed: bool = False
    committed: bool = False


_WAITING: ContextVar[Pending | None] = ContextVar("taskbound_pending_audit", default=None)


def claim() -> Pending | None:
    """For a store's write transaction about to commit: the records it must append, if this
    task has some waiting that no earlier transaction took. The store marks them
    ``committed`` after its commit, or releases the claim (``claimed = False``) when the
    transaction fails, so that a later one can still take them."""
    pending = _WAITING.get()
    if pending is None or pending.claimed or pending.owner is not asyncio.current_task():
        return None
    pending.claimed = True
    return pending


@asynccontextmanager
async def recorded(store: AuditStore, *events: AuditEvent) -> AsyncIterator[None]:
    """Make ``events`` part of the change the block makes (see the module docstring).
    A record the store could not take is refused (ValueError/TypeError) before the block
    runs, so nothing is changed for it."""
    for event in events:
        codec.audit_row(event)
    pending = Pending(events, asyncio.current_task())
    token = _WAITING.set(pending)
    try:
        yield
    finally:
        _WAITING.reset(token)
    if events and not pending.committed:
        await store.append_audits(list(events))
