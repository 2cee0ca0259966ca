"""Sample reports that follow the CONTRACT of taskbound.service.reports exactly: the
renderers (terminal, HTML, API, UI) are tested against them, and `FakeReports` serves them
as ``services.reports`` would (unknown agents refused, a policy set that fails to load)."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from taskbound.errors import NotFound, TaskboundError

BOT = "spiffe://taskbound.local/agents/bot"
TRIAGE = "spiffe://taskbound.local/agents/triage"
#: An agent id carrying markup: every renderer must show it as text.
HOSTILE = "spiffe://taskbound.local/agents/<script>alert(1)</script>"
GENERATED = "2025-03-31T12:00:00Z"
WINDOW = {"since": "2025-03-01T00:00:00Z", "until": "2025-03-31T00:00:00Z"}

USAGE: dict[str, Any] = {
    "kind": "usage",
    "window": dict(WINDOW),
    "generated_at": GENERATED,
    "empty": False,
    "agents": [
        {
            "agent": BOT,
            "owner": "alice",
            "state": "active",
            "granted": [
                {"tool": "issues", "tier": "read", "action": "get"},
                {"tool": "issues", "tier": "read", "action": "list"},
                {"tool": "issues", "tier": "write", "action": "comment"},
                {"tool": "issues", "tier": "admin", "action": "wipe"},
            ],
            "used": [
                {
                    "tool": "issues",
                    "tier": "read",
                    "action": "list",
                    "calls": 41,
                    "via_delegation": 0,
                    "last_used": "2025-03-30T16:02:11Z",
                }
            ],
            "unused": [
                {"tool": "issues", "tier": "read", "action": "get"},
                {"tool": "issues", "tier": "write", "action": "comment"},
                {"tool": "issues", "tier": "admin", "action": "wipe"},
            ],
            "granted_count": 4,
            "used_count": 1,
            "unused_share": 0.75,
            "tasks": 9,
            "calls": 47,
            "denied_calls": 6,
            "recommendation": {
                "ceiling": [{"tool": "issues", "tier": "read"}],
                "removed": [
                    {"tool": "issues", "tier": "write"},
                    {"tool": "issues", "tier": "admin"},
                ],
                "forbidden_actions": [{"tool": "issues", "tier": "read", "action": "get"}],
                "cedar": (
                    "// least privilege for spiffe://taskbound.local/agents/bot\n"
                    'forbid (principal == Agent::"spiffe://taskbound.local/agents/bot",\n'
                    '        action == Action::"issues.get", resource);\n'
                ),
                "cases_yaml": (
                    "- name: bot still lists issues\n  expect: allow\n"
                    "- name: bot no longer gets one issue\n  expect: deny\n"
                ),
                "diff": (
                    "--- a/least-privilege.cedar\n+++ b/least-privilege.cedar\n@@ -0,0 +1,2 @@\n"
                    '+forbid (principal == Agent::"spiffe://taskbound.local/agents/bot",\n'
                    '+        action == Action::"issues.get", resource);\n'
                ),
            },
        },
        {
            "agent": TRIAGE,
            "owner": "carol",
            "state": "active",
            "granted": [
                {"tool": "issues", "tier": "read", "action": "list"},
                {"tool": "issues", "tier": "write", "action": "comment"},
            ],
            "used": [
                {
                    "tool": "issues",
                    "tier": "read",
                    "action": "list",
                    "calls": 12,
                    "via_delegation": 2,
                    "last_used": "2025-03-29T08:15:00Z",
                },
                {
                    "tool": "issues",
                    "tier": "write",
                    "action": "comment",
                    "calls": 5,
                    "via_delegation": 0,
                    "last_used": "2025-03-29T08:16:40Z",
                },
            ],
            "unused": [],
            "granted_count": 2,
            "used_count": 2,
            "unused_share": 0.0,
            "tasks": 3,
            "calls": 19,
            "denied_calls": 2,
            "recommendation": None,
        },
    ],
    "owners": [
        {"owner": "alice", "agents": 1, "granted_count": 4, "used_count": 1, "unused_share": 0.75},
        {"owner": "carol", "agents": 1, "granted_count": 2, "used_count": 2, "unused_share": 0.0},
    ],
    "totals": {
        "agents": 2,
        "over_granted_agents": 1,
        "granted_count": 6,
        "used_count": 3,
        "unused_share": 0.5,
        "calls": 66,
        "denied_calls": 8,
        "tasks": 12,
    },
    "timeline": [
        {"day": "2025-03-28", "allow": 14, "deny": 3, "approval_required": 1, "error": 0},
        {"day": "2025-03-29", "allow": 25, "deny": 2, "approval_required": 2, "error": 1},
        {"day": "2025-03-30", "allow": 19, "deny": 3, "approval_required": 0, "error": 0},
    ],
    "decision_mix": {"allow": 58, "deny": 8, "approval_required": 3, "error": 1},
}

POSTURE: dict[str, Any] = {
    "kind": "posture",
    "window": dict(WINDOW),
    "generated_at": GENERATED,
    "empty": False,
    "findings": [
        {
            "code": "ceiling_spans_all_tiers",
            "severity": "high",
            "subject": {"type": "agent", "id": BOT},
            "message": "the ceiling of this agent spans every tier of issues (read, write, admin)",
            "evidence": {"tool": "issues", "tiers": ["read", "write", "admin"]},
        },
        {
            "code": "ttl_cap_too_long",
            "severity": "high",
            "subject": {"type": "deployment", "id": "credentials.max_ttl_seconds"},
            "message": "credentials may live 86400 s, above the 3600 s threshold",
            "evidence": {"max_ttl_seconds": 86400, "threshold_seconds": 3600},
        },
        {
            "code": "unused_authority",
            "severity": "medium",
            "subject": {"type": "agent", "id": BOT},
            "message": "3 of 4 granted actions were never used in the window (75%)",
            "evidence": {"granted_count": 4, "used_count": 1, "unused_share": 0.75},
        },
        {
            "code": "agent_owner_missing",
            "severity": "low",
            "subject": {"type": "agent", "id": HOSTILE},
            "message": "no accountable owner <b>named</b>",
            "evidence": {"owner": None},
        },
    ],
    "summary": {"high": 2, "medium": 1, "low": 1, "total": 4},
}

BLAST_RADIUS: dict[str, Any] = {
    "kind": "blast_radius",
    "subject": {"type": "agent", "id": BOT},
    "generated_at": GENERATED,
    "policy_version": "sha256:4f2a9c",
    "reach": [
        {
            "tool": "deploy",
            "tier": "admin",
            "action": "release",
            "via": [BOT, TRIAGE],
            "policies": ["default/admin-needs-approval"],
            "requires_approval": True,
            "risk": "high",
            "exception": None,
            "reachable_now": False,
            "always": False,
        },
        {
            "tool": "issues",
            "tier": "read",
            "action": "list",
            "via": [BOT],
            "policies": ["default/read"],
            "requires_approval": False,
            "risk": "low",
            "exception": None,
            "reachable_now": True,
            "always": True,
        },
        {
            "tool": "issues",
            "tier": "write",
            "action": "comment",
            "via": [BOT],
            "policies": ["default/write"],
            "requires_approval": False,
            "risk": "medium",
            "exception": "bg-7",
            "reachable_now": True,
            "always": False,
        },
    ],
    "delegates": [{"agent": TRIAGE, "owner": "carol", "reach_count": 1}],
    "totals": {
        "actions": 3,
        "tools": 2,
        "direct": 2,
        "through_delegation": 1,
        "admin_tier": 1,
        "via_exception": 1,
    },
}

ALIGNMENT: dict[str, Any] = {
    "kind": "alignment",
    "generated_at": GENERATED,
    "controls": [
        {
            "id": "short_lived_credentials",
            "title": "Short-lived, task-bound credentials",
            "status": "not_met",
            "evidence": ["credentials.max_ttl_seconds = 86400 (a day; at most 3600 expected)"],
            "frameworks": {
                "owasp_asi": ["ASI03"],
                "maestro": ["L3 Agent frameworks"],
                "nist_ai_rmf": ["MANAGE"],
            },
        },
        {
            "id": "dpop_required",
            "title": "Sender-constrained credentials (DPoP)",
            "status": "met",
            "evidence": ["dpop.required = true"],
            "frameworks": {
                "owasp_asi": ["ASI03", "ASI07"],
                "maestro": ["L4 Deployment and infrastructure"],
                "nist_ai_rmf": ["MANAGE"],
            },
        },
        {
            "id": "audit_chain",
            "title": "Tamper-evident audit trail",
            "status": "partly_met",
            "evidence": ["chain verified: 1042 records", "no checkpoint in the last 24 h"],
            "frameworks": {
                "owasp_asi": ["ASI10"],
                "maestro": ["L5 Evaluation and observability"],
                "nist_ai_rmf": ["GOVERN", "MEASURE"],
            },
        },
    ],
    "summary": {"met": 1, "partly_met": 1, "not_met": 1},
    "by_framework": {
        "owasp_asi": {"ASI03": "not_met", "ASI07": "met", "ASI10": "partly_met"},
        "maestro": {
            "L3 Agent frameworks": "not_met",
            "L4 Deployment and infrastructure": "met",
            "L5 Evaluation and observability": "partly_met",
        },
        "nist_ai_rmf": {"GOVERN": "partly_met", "MANAGE": "not_met", "MEASURE": "partly_met"},
    },
}


def empty_usage() -> dict[str, Any]:
    """A window with no data: zero counts and ``"empty": true``."""
    return {
        "kind": "usage",
        "window": dict(WINDOW),
        "generated_at": GENERATED,
        "empty": True,
        "agents": [],
        "owners": [],
        "totals": {
            "agents": 0,
            "over_granted_agents": 0,
            "granted_count": 0,
            "used_count": 0,
            "unused_share": 0.0,
            "calls": 0,
            "denied_calls": 0,
            "tasks": 0,
        },
        "timeline": [],
        "decision_mix": {"allow": 0, "deny": 0, "approval_required": 0, "error": 0},
    }


def empty_posture() -> dict[str, Any]:
    return {
        "kind": "posture",
        "window": dict(WINDOW),
        "generated_at": GENERATED,
        "empty": True,
        "findings": [],
        "summary": {"high": 0, "medium": 0, "low": 0, "total": 0},
    }


SAMPLES: dict[str, dict[str, Any]] = {
    "usage": USAGE,
    "posture": POSTURE,
    "blast_radius": BLAST_RADIUS,
    "alignment": ALIGNMENT,
}


class PolicyInvalid(TaskboundError):
    """What the computations raise when the policy set does not load."""

    code = "policy_invalid"
    status = 503
    default_detail = "the policy set failed to load"


class FakeReports:
    """``services.reports`` serving the samples, recording every call; ``empty`` answers
    empty windows, ``broken`` fails as a policy set that does not load."""

    def __init__(self, *, empty: bool = False, broken: bool = False) -> None:
        self.empty = empty
        self.broken = broken
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _check(self, agent: str | None) -> None:
        if self.broken:
            raise PolicyInvalid("the policy set failed to load: default/read.cedar line 3")
        if agent is not None and agent not in (BOT, TRIAGE, HOSTILE):
            raise NotFound("no such agent")

    async def usage(
        self,
        since: datetime,
        until: datetime,
        agent: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        self.calls.append(
            ("usage", {"since": since, "until": until, "agent": agent, "owner": owner})
        )
        self._check(agent)
        return empty_usage() if self.empty else copy.deepcopy(USAGE)

    async def posture(self, since: datetime, until: datetime) -> dict[str, Any]:
        self.calls.append(("posture", {"since": since, "until": until}))
        self._check(None)
        return empty_posture() if self.empty else copy.deepcopy(POSTURE)

    async def blast_radius(
        self, agent: str | None = None, task: str | None = None, credential: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(
            ("blast_radius", {"agent": agent, "task": task, "credential": credential})
        )
        self._check(agent)
        return copy.deepcopy(BLAST_RADIUS)

    async def alignment(self) -> dict[str, Any]:
        self.calls.append(("alignment", {}))
        self._check(None)
        return copy.deepcopy(ALIGNMENT)
