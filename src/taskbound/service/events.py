"""In-process change events: revocations and registry changes reach every component of
this process at once (the gateway's liveness cache first of all). Other processes learn of
them from the database (within the gateway's liveness bound today; by push with the
revocation feed)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("taskbound.events")


class Change(StrEnum):
    TASK_ENDED = "task.ended"
    CREDENTIAL_REVOKED = "credential.revoked"
    AGENT_CHANGED = "agent.changed"
    OWNER_CHANGED = "owner.changed"
    TOOL_CHANGED = "tool.changed"


@dataclass(frozen=True, slots=True)
class Event:
    change: Change
    key: str


class Events:
    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        self._subscribers.append(fn)

    def publish(self, change: Change, key: str) -> None:
        event = Event(change, key)
        for fn in self._subscribers:
            try:
                fn(event)
            except Exception:  # a subscriber's failure must not stop the others
                log.exception("event subscriber failed", extra={"change": change.value})
