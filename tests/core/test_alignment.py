"""Framework alignment: each control judged on the evidence, exactly."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from taskbound.core.alignment import (
    CONTROLS,
    MAESTRO_LAYERS,
    NIST_FUNCTIONS,
    OWASP_ASI,
    Evidence,
    alignment,
)

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

GOOD = Evidence(
    now=NOW,
    dpop_required=True,
    dpop_algorithms=("EdDSA",),
    credential_ttl_cap_seconds=600,
    task_ttl_cap_seconds=3600,
    max_credential_ttl_seconds=900,
    max_task_ttl_seconds=28800,
    policy_loaded=True,
    policy_version="sha256:x",
    policy_problems=(),
    risky_actions=3,
    approval_gates=2,
    audit_verified=True,
    audit_records=1000,
    audit_problem=None,
    last_checkpoint_at=NOW - timedelta(minutes=5),
    checkpoint_interval_seconds=300,
    checkpoint_max_intervals=3,
    checkpoint_published=True,
    revocation_staleness_seconds=5.0,
    max_revocation_staleness_seconds=30.0,
    breakglass_max_duration_seconds=4 * 3600,
    standing_breakglass_seconds=4 * 3600,
    breakglass_overdue_reviews=0,
    dev_issuer=False,
    trust_domains=1,
    oidc_issuers=0,
    agents=4,
    tools=2,
    agents_without_owner=0,
    active_agents_owner_disabled=0,
    unknown_ceiling_tools=0,
    unused_share=0.2,
    unused_share_threshold=0.5,
    static_secret_tools=1,
    shared_secret_tools=0,
    upstream_exchange_tools=1,
    delegation_max_depth=3,
)


def statuses(evidence: Evidence) -> dict[str, str]:
    return {c["id"]: c["status"] for c in alignment(evidence)["controls"]}


def test_a_well_configured_deployment_meets_every_control() -> None:
    report = alignment(GOOD)
    assert set(statuses(GOOD).values()) == {"met"}
    assert report["summary"] == {"met": len(CONTROLS), "partly_met": 0, "not_met": 0}
    by = report["by_framework"]
    assert list(by["owasp_asi"]) == list(OWASP_ASI)
    # A gateway limits what a hijacked or poisoned agent can reach; it does not prevent
    # code execution (ASI05) or memory poisoning (ASI06): those are not claimed.
    assert by["owasp_asi"]["ASI05"] == by["owasp_asi"]["ASI06"] == "not_covered"
    assert {k: v for k, v in by["owasp_asi"].items() if k not in ("ASI05", "ASI06")} == {
        k: "met" for k in OWASP_ASI if k not in ("ASI05", "ASI06")
    }
    assert list(by["maestro"]) == list(MAESTRO_LAYERS)
    assert by["maestro"]["L1 Foundation models"] == "not_covered"
    assert by["maestro"]["L2 Data operations"] == "not_covered"
    assert list(by["nist_ai_rmf"]) == list(NIST_FUNCTIONS)
    assert set(by["nist_ai_rmf"].values()) == {"met"}


def test_a_misconfigured_deployment_is_not_met() -> None:
    bad = replace(
        GOOD, dpop_required=False, credential_ttl_cap_seconds=86400, task_ttl_cap_seconds=86400
    )
    got = statuses(bad)
    assert got["dpop_binding"] == "not_met"
    assert got["short_lived_task_credentials"] == "not_met"
    report = alignment(bad)
    assert report["by_framework"]["owasp_asi"]["ASI03"] == "not_met"
    assert report["summary"]["not_met"] == 2
    dpop = next(c for c in report["controls"] if c["id"] == "dpop_binding")
    assert dpop["evidence"] == ["DPoP is not required: credentials work as bearer tokens"]
    assert dpop["frameworks"] == {
        "owasp_asi": ["ASI03", "ASI07"],
        "maestro": ["L4 Deployment infrastructure", "L7 Agent ecosystem"],
        "nist_ai_rmf": ["MANAGE"],
    }


@pytest.mark.parametrize(
    ("changes", "control", "status"),
    [
        ({"credential_ttl_cap_seconds": 1800}, "short_lived_task_credentials", "partly_met"),
        ({"credential_ttl_cap_seconds": 3601}, "short_lived_task_credentials", "not_met"),
        ({"dpop_algorithms": ()}, "dpop_binding", "not_met"),
        ({"policy_loaded": False}, "per_call_policy", "not_met"),
        ({"policy_problems": ("x.cedar:1: bad",)}, "per_call_policy", "partly_met"),
        ({"approval_gates": 0}, "human_approval", "not_met"),
        ({"approval_gates": 0, "risky_actions": 0}, "human_approval", "partly_met"),
        ({"breakglass_overdue_reviews": 1}, "breakglass_expiry_and_review", "not_met"),
        ({"breakglass_max_duration_seconds": 86400}, "breakglass_expiry_and_review", "partly_met"),
        ({"revocation_staleness_seconds": 60.0}, "revocation_fail_closed", "partly_met"),
        ({"delegation_max_depth": 5}, "delegation_narrows", "partly_met"),
        ({"audit_verified": False, "audit_problem": "record 7"}, "tamper_evident_audit", "not_met"),
        ({"audit_verified": None}, "tamper_evident_audit", "partly_met"),
        ({"last_checkpoint_at": None}, "tamper_evident_audit", "partly_met"),
        ({"last_checkpoint_at": NOW - timedelta(hours=1)}, "tamper_evident_audit", "partly_met"),
        ({"checkpoint_published": False}, "tamper_evident_audit", "partly_met"),
        ({"checkpoint_interval_seconds": 0}, "tamper_evident_audit", "partly_met"),
        ({"dev_issuer": True}, "workload_identity", "partly_met"),
        ({"dev_issuer": True, "trust_domains": 0}, "workload_identity", "not_met"),
        ({"trust_domains": 0}, "workload_identity", "not_met"),
        ({"unused_share": 0.5}, "least_privilege_ceilings", "partly_met"),
        ({"unused_share": None}, "least_privilege_ceilings", "partly_met"),
        ({"shared_secret_tools": 1}, "secrets_never_to_agents", "partly_met"),
        ({"agents_without_owner": 1}, "accountable_owners", "not_met"),
        ({"active_agents_owner_disabled": 1}, "accountable_owners", "partly_met"),
        ({"tools": 0}, "declared_tools", "partly_met"),
        ({"unknown_ceiling_tools": 2}, "declared_tools", "partly_met"),
    ],
)
def test_each_judgement(changes: dict[str, object], control: str, status: str) -> None:
    got = statuses(replace(GOOD, **changes))  # type: ignore[arg-type]
    assert got.pop(control) == status
    if "policy_loaded" in changes:
        # without a policy set there are no approval gates either
        assert got.pop("human_approval") == "not_met"
    assert got == {c.id: "met" for c in CONTROLS if c.id in got}
    assert len(got) >= len(CONTROLS) - 2


def test_the_catalogue_maps_only_known_entries() -> None:
    for control in CONTROLS:
        assert set(control.owasp_asi) <= set(OWASP_ASI)
        assert set(control.maestro) <= set(MAESTRO_LAYERS)
        assert set(control.nist_ai_rmf) <= set(NIST_FUNCTIONS)
        assert all((control.owasp_asi, control.maestro, control.nist_ai_rmf))
    assert len({c.id for c in CONTROLS}) == len(CONTROLS)
