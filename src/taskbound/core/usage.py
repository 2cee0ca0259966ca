"""Aggregates of the audit log that the posture reports read (docs/reports.md): counts
grouped in the store, so a report over millions of records never loads them.

Pure values: the storage adapters produce them, :mod:`taskbound.core.posture` consumes
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

#: The audit event of a tool call through the gateway: the only event usage counts.
GATEWAY_CALL: Final = "gateway.call"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """``gateway.call`` records of one (agent, owner, task, tool, action, tier, decision):
    how many, and the time of the latest. ``agent`` is the acting agent as recorded (a
    delegate, for a delegated credential's call)."""

    agent: str | None
    owner: str | None
    task: str | None
    tool: str | None
    action: str | None
    tier: str | None
    decision: str
    calls: int
    last_used: datetime


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """``gateway.call`` records of one UTC day (``YYYY-MM-DD``) with one decision."""

    day: str
    decision: str
    count: int
