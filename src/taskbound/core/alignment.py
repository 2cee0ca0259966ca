"""Framework alignment (docs/reports.md): taskbound's controls, each mapped to the OWASP Top
10 for Agentic Applications (2026, ASI01–ASI10), the CSA MAESTRO layers and the NIST AI RMF
functions, and marked met / partly met / not met from this deployment's live settings and
evidence.

Pure: the evidence is gathered by the caller (:class:`taskbound.service.reports.ReportService`)
and passed in with the time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "CONTROLS",
    "MAESTRO_LAYERS",
    "NIST_FUNCTIONS",
    "OWASP_ASI",
    "Control",
    "Evidence",
    "alignment",
]

Status = Literal["met", "partly_met", "not_met"]

#: OWASP Top 10 for Agentic Applications (OWASP GenAI Security Project, December 2025).
OWASP_ASI: Final[Mapping[str, str]] = {
    "ASI01": "Agent Goal Hijack",
    "ASI02": "Tool Misuse and Exploitation",
    "ASI03": "Identity and Privilege Abuse",
    "ASI04": "Agentic Supply Chain Vulnerabilities",
    "ASI05": "Unexpected Code Execution",
    "ASI06": "Memory and Context Poisoning",
    "ASI07": "Insecure Inter-Agent Communication",
    "ASI08": "Cascading Failures",
    "ASI09": "Human-Agent Trust Exploitation",
    "ASI10": "Rogue Agents",
}
#: CSA MAESTRO's seven layers.
MAESTRO_LAYERS: Final = (
    "L1 Foundation models",
    "L2 Data operations",
    "L3 Agent frameworks",
    "L4 Deployment infrastructure",
    "L5 Evaluation and observability",
    "L6 Security and compliance",
    "L7 Agent ecosystem",
)
#: NIST AI RMF 1.0 core functions.
NIST_FUNCTIONS: Final = ("GOVERN", "MAP", "MEASURE", "MANAGE")

_RANK: Final[Mapping[str, int]] = {"not_met": 0, "partly_met": 1, "met": 2}
# A cap this many times above its threshold is not met (a credential cap of a day against
# 15 minutes), rather than partly met.
_FAR_ABOVE: Final = 4


@dataclass(frozen=True, slots=True)
class Evidence:
    """The live settings and facts the controls are judged on."""

    now: datetime
    # Credentials
    dpop_required: bool
    dpop_algorithms: tuple[str, ...]
    credential_ttl_cap_seconds: int
    task_ttl_cap_seconds: int
    max_credential_ttl_seconds: int  # thresholds ([reports])
    max_task_ttl_seconds: int
    # Policy
    policy_loaded: bool
    policy_version: str | None
    policy_problems: tuple[str, ...]  # the last reload's problems (the old set in force)
    # Approvals: registered actions that are admin-tier, high-risk or marked for approval,
    # and the approval gates of the policy set in force
    risky_actions: int
    approval_gates: int
    # Audit: None when the chain was not verified for this report
    audit_verified: bool | None
    audit_records: int
    audit_problem: str | None
    last_checkpoint_at: datetime | None
    checkpoint_interval_seconds: int  # 0: checkpoints only on demand
    checkpoint_max_intervals: int
    checkpoint_published: bool  # a checkpoint file or webhook is configured
    # Revocation
    revocation_staleness_seconds: float
    max_revocation_staleness_seconds: float
    # Break-glass
    breakglass_max_duration_seconds: int
    standing_breakglass_seconds: int
    breakglass_overdue_reviews: int
    # Identity
    dev_issuer: bool
    trust_domains: int
    oidc_issuers: int
    # Registry
    agents: int
    tools: int
    agents_without_owner: int
    active_agents_owner_disabled: int
    unknown_ceiling_tools: int  # ceiling entries naming no registered tool
    # Least privilege: the share of granted actions unused in the window (None: no call
    # observed)
    unused_share: float | None
    unused_share_threshold: float
    # Secrets
    static_secret_tools: int
    shared_secret_tools: int  # static secrets reached by many agents
    upstream_exchange_tools: int
    delegation_max_depth: int


@dataclass(frozen=True, slots=True)
class Control:
    id: str
    title: str
    owasp_asi: tuple[str, ...]
    maestro: tuple[str, ...]
    nist_ai_rmf: tuple[str, ...]
    judge: Callable[[Evidence], tuple[Status, list[str]]]


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- the judges ----------------------------------------------------------------------------


def _short_lived(e: Evidence) -> tuple[Status, list[str]]:
    cred, task = e.credential_ttl_cap_seconds, e.task_ttl_cap_seconds
    out = [
        f"credentials.max_ttl_seconds = {cred} (threshold {e.max_credential_ttl_seconds})",
        f"credentials.task_max_ttl_seconds = {task} (threshold {e.max_task_ttl_seconds})",
        "every credential names one task, one tool (audience) and one tier",
    ]
    if (
        cred > _FAR_ABOVE * e.max_credential_ttl_seconds
        or task > _FAR_ABOVE * e.max_task_ttl_seconds
    ):
        return "not_met", out
    if cred > e.max_credential_ttl_seconds or task > e.max_task_ttl_seconds:
        return "partly_met", out
    return "met", out


def _dpop(e: Evidence) -> tuple[Status, list[str]]:
    if not e.dpop_required:
        return "not_met", ["DPoP is not required: credentials work as bearer tokens"]
    if not e.dpop_algorithms:
        return "not_met", ["no DPoP algorithm is accepted"]
    return "met", [
        "every credential is bound to the agent's key (cnf.jkt, RFC 9449); bearer use is refused",
        f"dpop.algorithms = {list(e.dpop_algorithms)}",
    ]


def _per_call_policy(e: Evidence) -> tuple[Status, list[str]]:
    if not e.policy_loaded:
        return "not_met", ["no policy set is loaded: every call is denied"]
    out = [f"policy set {e.policy_version} decides every gateway call (Cedar, default deny)"]
    if e.policy_problems:
        out.append(
            f"the last reload was refused ({len(e.policy_problems)} problem(s)); "
            f"the last good set stays in force: {e.policy_problems[0]}"
        )
        return "partly_met", out
    return "met", out


def _approvals(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        f"{e.risky_actions} registered action(s) are admin-tier, high-risk or marked "
        "requires_approval",
        f"{e.approval_gates} approval gate(s) (@approval forbid policies) in force",
    ]
    if e.approval_gates and e.policy_loaded:
        return "met", out
    if e.risky_actions:
        return "not_met", [*out, "risky actions run without a human approval"]
    return "partly_met", [*out, "no risky action is registered and no approval gate exists"]


def _breakglass(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        f"breakglass.max_duration_seconds = {e.breakglass_max_duration_seconds} "
        f"(standing above {e.standing_breakglass_seconds})",
        f"{e.breakglass_overdue_reviews} ended exception(s) overdue for review",
    ]
    if e.breakglass_overdue_reviews:
        return "not_met", out
    if e.breakglass_max_duration_seconds > e.standing_breakglass_seconds:
        return "partly_met", out
    return "met", out


def _revocation(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        f"revocation.staleness_bound_seconds = {e.revocation_staleness_seconds:g}: gateways "
        "refuse calls when their revocation feed is staler "
        f"(threshold {e.max_revocation_staleness_seconds:g})"
    ]
    if e.revocation_staleness_seconds > e.max_revocation_staleness_seconds:
        return "partly_met", out
    return "met", out


def _delegation(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        "token exchange only narrows (tool, tier, actions, constraints, lifetime), within "
        "the delegate's own ceiling and the same owner",
        f"delegation.max_depth = {e.delegation_max_depth}",
    ]
    return ("met" if e.delegation_max_depth <= 3 else "partly_met"), out


def _audit(e: Evidence) -> tuple[Status, list[str]]:
    out: list[str] = []
    status: Status = "met"
    if e.audit_verified is None:
        out.append(
            f"the chain ({e.audit_records} records) was not verified for this report: run "
            "`taskbound audit verify`"
        )
        status = "partly_met"
    elif e.audit_verified:
        out.append(f"the hash chain verified: {e.audit_records} records")
    else:
        return "not_met", [f"the hash chain does NOT verify: {e.audit_problem}"]
    if e.last_checkpoint_at is None:
        out.append("no signed checkpoint exists")
        status = "partly_met"
    else:
        age = (e.now - e.last_checkpoint_at).total_seconds()
        out.append(f"latest signed checkpoint {_ts(e.last_checkpoint_at)} ({int(age)} s ago)")
        interval = e.checkpoint_interval_seconds
        if interval == 0:
            out.append("audit.checkpoint_interval_seconds = 0: checkpoints only on demand")
            status = "partly_met"
        elif age > interval * e.checkpoint_max_intervals:
            out.append(
                f"older than {e.checkpoint_max_intervals} checkpoint intervals ({interval} s)"
            )
            status = "partly_met"
    if not e.checkpoint_published:
        out.append("checkpoints are not published outside the database (checkpoint_file/webhook)")
        status = "partly_met"
    return status, out


def _identity(e: Evidence) -> tuple[Status, list[str]]:
    real = e.trust_domains + e.oidc_issuers
    out = [
        f"{e.trust_domains} SPIFFE trust domain(s), {e.oidc_issuers} OIDC issuer(s) configured",
        f"identity.dev_issuer = {str(e.dev_issuer).lower()}",
    ]
    if e.dev_issuer and not real:
        return "not_met", [*out, "workload identities come only from the development issuer"]
    if e.dev_issuer:
        return "partly_met", [*out, "the development issuer is on beside the real issuers"]
    if not real:
        return "not_met", [*out, "no workload identity issuer is configured"]
    return "met", out


def _least_privilege(e: Evidence) -> tuple[Status, list[str]]:
    out = [f"{e.agents} agent(s), each bounded by a ceiling of (tool, tier) scopes"]
    if e.unused_share is None:
        return "partly_met", [
            *out,
            "no gateway call was observed in the window: unused authority could not be measured",
        ]
    out.append(
        f"{e.unused_share:.1%} of granted actions unused in the window "
        f"(threshold {e.unused_share_threshold:.0%})"
    )
    return ("met" if e.unused_share < e.unused_share_threshold else "partly_met"), out


def _secrets(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        "the gateway removes the agent's credential and injects the upstream secret; agents "
        "never receive it; secrets are encrypted at rest under the KEK",
        f"{e.static_secret_tools} tool(s) with a static upstream secret, "
        f"{e.upstream_exchange_tools} with per-task upstream token exchange",
    ]
    if e.shared_secret_tools:
        return "partly_met", [
            *out,
            f"{e.shared_secret_tools} tool(s) whose one static secret many agents reach",
        ]
    return "met", out


def _owners(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        f"{e.agents_without_owner} agent(s) without a registered owner",
        f"{e.active_agents_owner_disabled} active agent(s) whose owner is disabled",
    ]
    if e.agents_without_owner:
        return "not_met", out
    if e.active_agents_owner_disabled:
        return "partly_met", out
    return "met", out


def _registry(e: Evidence) -> tuple[Status, list[str]]:
    out = [
        f"{e.tools} tool(s) declared with a pinned audience, upstream URL and actions",
        f"{e.unknown_ceiling_tools} ceiling entr(y/ies) naming no registered tool",
    ]
    if not e.tools:
        return "partly_met", [*out, "no tool is registered yet"]
    if e.unknown_ceiling_tools:
        return "partly_met", out
    return "met", out


_L3, _L4, _L5, _L6, _L7 = MAESTRO_LAYERS[2:]

#: The catalogue, in report order.
CONTROLS: Final[tuple[Control, ...]] = (
    Control(
        "short_lived_task_credentials",
        "Short-lived credentials bound to one task, one tool and one tier",
        ("ASI03", "ASI02", "ASI10"),
        (_L4, _L6),
        ("MANAGE", "GOVERN"),
        _short_lived,
    ),
    Control(
        "dpop_binding",
        "Sender-constrained credentials (DPoP, RFC 9449)",
        ("ASI03", "ASI07"),
        (_L4, _L7),
        ("MANAGE",),
        _dpop,
    ),
    Control(
        "per_call_policy",
        "Every tool call checked against Cedar policy at the gateway",
        # Not ASI05 (code execution) or ASI06 (memory/context poisoning): a gateway limits
        # what such an agent can then reach, it does not prevent either — not covered.
        ("ASI01", "ASI02", "ASI10"),
        (_L3, _L6),
        ("GOVERN", "MANAGE"),
        _per_call_policy,
    ),
    Control(
        "human_approval",
        "Human approval of risky actions, bound to the exact call",
        ("ASI09", "ASI02", "ASI01"),
        (_L3, _L6),
        ("GOVERN", "MANAGE"),
        _approvals,
    ),
    Control(
        "breakglass_expiry_and_review",
        "Break-glass exceptions with hard expiry and mandatory review",
        ("ASI03", "ASI10"),
        (_L6,),
        ("GOVERN", "MANAGE"),
        _breakglass,
    ),
    Control(
        "revocation_fail_closed",
        "Revocation pushed to gateways, fail closed when the feed is stale",
        ("ASI08", "ASI10", "ASI03"),
        (_L4,),
        ("MANAGE",),
        _revocation,
    ),
    Control(
        "delegation_narrows",
        "Delegation by token exchange only narrows, with bounded depth",
        ("ASI07", "ASI03", "ASI08"),
        (_L3, _L7),
        ("GOVERN", "MANAGE"),
        _delegation,
    ),
    Control(
        "tamper_evident_audit",
        "Tamper-evident audit: verified hash chain, signed and published checkpoints",
        ("ASI10", "ASI09", "ASI03"),
        (_L5, _L6),
        ("MEASURE", "GOVERN"),
        _audit,
    ),
    Control(
        "workload_identity",
        "Workload identity (SPIFFE JWT-SVID or OIDC), no shared secrets",
        ("ASI03", "ASI07"),
        (_L4, _L7),
        ("GOVERN", "MAP"),
        _identity,
    ),
    Control(
        "least_privilege_ceilings",
        "Least-privilege ceilings; unused authority measured",
        ("ASI03", "ASI02"),
        (_L3, _L6),
        ("MAP", "MEASURE", "MANAGE"),
        _least_privilege,
    ),
    Control(
        "secrets_never_to_agents",
        "Upstream secrets injected by the gateway, never given to agents",
        ("ASI03", "ASI02", "ASI04"),
        (_L4,),
        ("MANAGE",),
        _secrets,
    ),
    Control(
        "accountable_owners",
        "Every agent has an accountable, enabled human owner",
        ("ASI09", "ASI10", "ASI03"),
        (_L6, _L7),
        ("GOVERN", "MAP"),
        _owners,
    ),
    Control(
        "declared_tools",
        "Tools are declared destinations: nothing else is reachable",
        ("ASI04", "ASI02"),
        (_L7, _L4),
        ("MAP", "GOVERN"),
        _registry,
    ),
)


def _worst(statuses: Sequence[Status]) -> str:
    if not statuses:
        return "not_covered"
    return min(statuses, key=lambda s: _RANK[s])


def alignment(evidence: Evidence, controls: Sequence[Control] = CONTROLS) -> dict[str, Any]:
    """The ``alignment`` report of the contract (without ``generated_at``, which the caller
    adds): each control judged on ``evidence``; per framework entry, the worst status of
    the controls mapped to it (``not_covered`` when none is)."""
    out: list[dict[str, Any]] = []
    by: dict[str, dict[str, list[Status]]] = {
        "owasp_asi": {k: [] for k in OWASP_ASI},
        "maestro": {k: [] for k in MAESTRO_LAYERS},
        "nist_ai_rmf": {k: [] for k in NIST_FUNCTIONS},
    }
    for control in controls:
        status, notes = control.judge(evidence)
        frameworks = {
            "owasp_asi": list(control.owasp_asi),
            "maestro": list(control.maestro),
            "nist_ai_rmf": list(control.nist_ai_rmf),
        }
        for key, entries in frameworks.items():
            for entry in entries:
                by[key][entry].append(status)
        out.append(
            {
                "id": control.id,
                "title": control.title,
                "status": status,
                "evidence": notes,
                "frameworks": frameworks,
            }
        )
    summary = {s: sum(1 for c in out if c["status"] == s) for s in ("met", "partly_met", "not_met")}
    return {
        "kind": "alignment",
        "controls": out,
        "summary": summary,
        "by_framework": {
            key: {entry: _worst(statuses) for entry, statuses in entries.items()}
            for key, entries in by.items()
        },
    }
