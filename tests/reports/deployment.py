"""A test deployment with known usage for the report outputs: the registry of
tests/api/conftest.py plus a second agent, and gateway call records over three days
(appended to the audit trail as the gateway writes them)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from taskbound.core.model import AuditEvent
from tests.api.conftest import AGENT, REGISTRY, Live

TRIAGE = "spiffe://taskbound.local/agents/triage"
#: (day offset, agent, action, tier, decision, count): what the gateway recorded.
CALLS: list[tuple[int, str, str, str, str, int]] = [
    (-3, AGENT, "list", "read", "allow", 6),
    (-3, AGENT, "wipe", "admin", "deny", 2),
    (-2, AGENT, "list", "read", "allow", 9),
    (-2, TRIAGE, "list", "read", "allow", 4),
    (-2, TRIAGE, "comment", "write", "approval_required", 1),
    (-1, TRIAGE, "comment", "write", "allow", 3),
    (-1, AGENT, "comment", "write", "deny", 1),
]


async def deploy(live: Live) -> None:
    """The second agent (ceiling: issues read and write, like the first) and the calls."""
    doc: dict[str, Any] = {**REGISTRY, "agents": [*REGISTRY["agents"]]}
    doc["agents"].append(
        {
            "spiffe_id": TRIAGE,
            "owner": "bob",
            "ceiling": [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}],
        }
    )
    r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
    assert r.status_code == 200, r.text
    now = live.clock.now()
    events = []
    for day, agent, action, tier, decision, count in CALLS:
        for i in range(count):
            events.append(
                AuditEvent(
                    time=now + timedelta(days=day, minutes=i),
                    event="gateway.call",
                    decision=decision,
                    code=None if decision == "allow" else decision,
                    agent=agent,
                    owner="alice" if agent == AGENT else "bob",
                    task=f"tsk_{agent[-3:]}{day}",
                    tool="issues",
                    action=action,
                    tier=tier,
                    detail=f"call {i}",
                )
            )
    await live.services.storage.append_audits(events)
