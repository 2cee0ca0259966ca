"""Hostile review of delegation (RFC 8693 token exchange) and of the revocation of chains.

Tests that fail on the code they were written against name a finding in their docstring
("FINDING"); the others pin down defences that were probed and held.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from taskbound.core.clock import FakeClock
from taskbound.core.keys import generate_key, jwk_thumbprint, public_jwk
from taskbound.core.model import KeyPurpose
from taskbound.core.tokens import CredentialClaims, mint_credential, verify_credential
from tests.api.conftest import Agent
from tests.api.test_delegation import (
    LEAF,
    ORCH,
    SUB,
    SUBSUB,
    Hop,
    World,
    assert_status,
    chain,
    open_world,
)


@pytest.fixture(name="world", params=["sqlite", "postgres"])
async def _world(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[World]:
    async with open_world(str(request.param), tmp_path, clock) as w:
        yield w


ISSUES_RW = [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}]


def details(**entry: Any) -> str:
    return json.dumps([{"type": "taskbound_tool", **entry}])


async def move_to_owner_bob(world: World, spiffe_id: str) -> None:
    """Create owner bob (enabled) and make it the accountable owner of ``spiffe_id``."""
    http, admin = world.live.http, world.live.admin
    r = await http.post(
        "/v1/admin/owners", json={"id": "bob", "contact": "bob@example.com"}, headers=admin
    )
    assert r.status_code == 201, r.text
    spec = {"spiffe_id": spiffe_id, "owner": "bob", "ceiling": ISSUES_RW}
    r = await http.put(f"/v1/admin/agents/{spiffe_id}", json=spec, headers=admin)
    assert r.status_code == 200, r.text


async def disable_bob(world: World) -> None:
    spec = {"id": "bob", "contact": "bob@example.com", "disabled": True}
    r = await world.live.http.put("/v1/admin/owners/bob", json=spec, headers=world.live.admin)
    assert r.status_code == 200, r.text


def claims_of(world: World, token: str) -> CredentialClaims:
    services = world.live.services
    aud = Hop(None, token).claims["aud"]  # type: ignore[arg-type]
    return verify_credential(
        token,
        keys=services.keys.keyring(),
        issuer=services.settings.issuer,
        audiences={aud},
        algorithms=(services.keys.signer().alg,),
        now=world.live.clock.now(),
        leeway=timedelta(seconds=30),
    )


# --- findings ----------------------------------------------------------------------------


async def test_disabling_a_middle_delegates_owner_kills_the_chain_below_it(world: World) -> None:
    """FINDING: orchestrator → sub → subsub, all alice's; sub is then made accountable to
    bob, and bob is disabled. Sub's own credential is refused at the gateway, but subsub's
    keeps working: the gateway checks the owner of the current holder only (checks.py
    liveness, ``holder_owner``), storage revokes only bob's *tasks* (sql.py update_owner),
    not the credentials held by bob's agents in other tasks, and the revocation state's
    Standing carries only the task's owner. (Moving an agent to another owner revokes
    nothing either.)"""
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)
    await move_to_owner_bob(world, SUB)
    await disable_bob(world)
    assert_status(await world.call(sub), 401, "invalid_token")
    seen = len(world.echo.seen)
    assert_status(await world.call(subsub), 401, "invalid_token")
    assert len(world.echo.seen) == seen
    assert (await world.introspect(subsub))["active"] is False


async def test_a_delegate_whose_owner_is_disabled_cannot_delegate_further(
    world: World,
) -> None:
    """FINDING: sub holds a delegated credential, is moved to owner bob, bob is disabled;
    sub can still hand its credential on by token exchange: Broker.exchange checks the
    actor's owner and the chain's agents' states, never the owners of the agents already
    in the chain; introspection calls sub's credential active too."""
    orch = await world.root()
    sub = await world.delegate(orch, await world.agent(SUB))
    await move_to_owner_bob(world, SUB)
    await disable_bob(world)
    assert (await world.introspect(sub))["active"] is False
    await world.refused("invalid_request", orch.task, sub, await world.agent(LEAF))


async def test_may_act_is_not_lost_at_the_second_hop(world: World) -> None:
    """FINDING: a task started with ``may_act`` = sub may be delegated to sub only, but the
    credential sub gets carries no ``may_act`` (broker.py exchange never sets it), so sub
    can hand it to any agent: the child is more delegable than its parent (not a strict
    attenuation, DESIGN.md invariant 3)."""
    agent = await world.agent(ORCH)
    r = await agent.start(
        intent={"purpose": "triage", "constraints": {"org": "acme", "repo": ["web"]}},
        scopes=[{"tool": "issues", "tier": "read"}],
        may_act=SUB,
    )
    assert r.status_code == 201, r.text
    only_sub = Hop(agent, r.json()["credentials"][0]["access_token"])
    await world.refused("invalid_grant", only_sub.task, only_sub, await world.agent(SUBSUB))
    sub = await world.delegate(only_sub, await world.agent(SUB))
    await world.refused("invalid_grant", only_sub.task, sub, await world.agent(SUBSUB))


async def test_a_token_signed_by_a_withdrawn_key_is_refused_even_if_seen_before(
    world: World,
) -> None:
    """FINDING: a key that was rotated out (still trusted during its overlap) leaks; the
    attacker signs a copy of a live credential bound to its own DPoP key. After the admin
    withdraws the key the forged token keeps passing: the gateway's verified-token cache
    (checks.py ``_verified``) is not cleared by a KEY revocation, the revocation state
    checks the *record's* kid (the new key), and liveness never compares the token's
    ``cnf.jkt`` with the record's."""
    services = world.live.services
    http, admin = world.live.http, world.live.admin
    leaked = services.keys.signer(KeyPurpose.CREDENTIALS)
    r = await http.post("/v1/admin/keys/rotate", headers=admin)
    assert r.status_code == 201, r.text
    victim = await world.root()  # signed by the new key
    attacker = Agent(world.live, victim.agent.identity, generate_key("EdDSA"))
    forged_claims = dataclasses.replace(
        claims_of(world, victim.token), jkt=jwk_thumbprint(public_jwk(attacker.key))
    )
    forged = Hop(attacker, mint_credential(forged_claims, leaked))
    await world.call(forged)  # before the leak is known: whatever it answers
    r = await http.post(f"/v1/admin/keys/{leaked.kid}/withdraw", headers=admin)
    assert r.status_code == 200, r.text
    seen = len(world.echo.seen)
    assert_status(await world.call(forged), 401, "invalid_token")
    assert len(world.echo.seen) == seen
    assert_status(await world.call(victim), 200)


async def test_a_token_not_bound_to_its_records_key_is_refused(world: World) -> None:
    """FINDING (defence in depth): the credential record holds the DPoP thumbprint it was
    issued for, but the gateway never compares it with the token's ``cnf.jkt``; a token
    re-signed by a credential key (a leaked retiring one, a bug in a minting path) moves
    a live credential to another key unnoticed."""
    services = world.live.services
    victim = await world.root()
    attacker = Agent(world.live, victim.agent.identity, generate_key("EdDSA"))
    rebound = dataclasses.replace(
        claims_of(world, victim.token), jkt=jwk_thumbprint(public_jwk(attacker.key))
    )
    token = mint_credential(rebound, services.keys.signer(KeyPurpose.CREDENTIALS))
    seen = len(world.echo.seen)
    assert_status(await world.call(Hop(attacker, token)), 401, "invalid_token")
    assert len(world.echo.seen) == seen


async def test_deeply_nested_authorization_details_is_a_clean_audited_refusal(
    world: World,
) -> None:
    """FINDING: authorization_details under the 8192-character cap but nested thousands
    deep makes json.loads raise RecursionError, which exchange.py ``_details`` does not
    catch (only ValueError): the token endpoint answers 500 and the refusal is not
    audited (DESIGN.md invariant 6)."""
    orch = await world.root()
    deep = "[" * 4000 + "]" * 4000
    await world.refused(
        "invalid_request", orch.task, orch, await world.agent(SUB), authorization_details=deep
    )


# --- defences that held ------------------------------------------------------------------


async def test_constraint_type_tricks_never_widen(world: World) -> None:
    """Values of another type, case, Unicode look-alikes, empty lists and nested values
    are refused (never coerced); only a true narrowing is issued."""
    orch = await world.root()  # org "acme", repo ["web", "api"], tiers ["read"]
    sub = await world.agent(SUB)
    task = orch.task
    for error, constraints in (
        ("invalid_scope", {"repo": "WEB"}),
        ("invalid_scope", {"repo": "web\u200b"}),
        ("invalid_scope", {"repo": ["web", "Api"]}),
        ("invalid_scope", {"repo": []}),
        ("invalid_scope", {"org": ["acme", "evil"]}),
        ("invalid_scope", {"tiers": "write"}),
        ("invalid_request", {"repo": 1}),
        ("invalid_request", {"repo": True}),
        ("invalid_request", {"repo": None}),
        ("invalid_request", {"repo": ["web", 1]}),
        ("invalid_request", {"repo": {"in": ["web", "evil"]}}),
        ("invalid_request", {"repo": [["web", "evil"]]}),
    ):
        await world.refused(
            error, task, orch, sub, authorization_details=details(constraints=constraints)
        )
    for error, params in (
        ("invalid_scope", {"scope": "list\u00a0comment"}),
        ("invalid_scope", {"scope": "issues:read:write"}),
        ("invalid_scope", {"scope": "ISSUES:read"}),
        ("invalid_scope", {"authorization_details": details(actions=[])}),
        ("invalid_request", {"authorization_details": details(actions="list")}),
        ("invalid_request", {"authorization_details": json.dumps([{}, {}])}),
        ("invalid_request", {"authorization_details": json.dumps({"type": "taskbound_tool"})}),
    ):
        await world.refused(error, task, orch, sub, **params)
    ok = await world.delegate(
        orch, sub, authorization_details=details(constraints={"repo": "web", "extra": ["x"]})
    )
    got = ok.claims["authorization_details"][0]["constraints"]
    assert got == {"org": "acme", "repo": "web", "tiers": ["read"], "extra": ["x"]}
    assert_status(await world.call(ok), 200)
    assert_status(await world.call(ok, path="/issues/repos/acme/api/issues"), 403)


async def test_the_delegates_proof_is_not_the_parents_consent(
    world: World,
) -> None:
    """The delegate's own proof cannot stand in for the parent's consent, and a
    delegate cannot present the parent's credential at the gateway."""
    orch = await world.root()
    sub_agent = await world.agent(SUB)
    task = orch.task
    # The delegate's plain proof as the consent.
    await world.refused(
        "invalid_request",
        task,
        orch,
        sub_agent,
        subject_dpop=sub_agent.proof("POST", "/oauth/token"),
    )
    sub = await world.delegate(orch, sub_agent)
    # The delegate holds the parent's token after the exchange, not its key.
    assert_status(await world.call(orch, key=sub_agent), 401, "invalid_dpop_proof")
    assert_status(await world.call(sub), 200)


async def test_resuming_a_middle_delegate_does_not_revive_the_chain_below(world: World) -> None:
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)
    http, admin = world.live.http, world.live.admin
    r = await http.post(f"/v1/admin/agents/{SUB}/quarantine", headers=admin)
    assert r.status_code == 200, r.text
    r = await http.post(f"/v1/admin/agents/{SUB}/resume", headers=admin)
    assert r.status_code == 200, r.text
    assert_status(await world.call(subsub), 401, "invalid_token")
    # Re-applying the registry (no state given) leaves the resumed agent active but the
    # chain dead; the orchestrator's own credential is untouched throughout.
    assert_status(await world.call(orch), 200)
    # A new exchange after the resume works: it is a new credential, decided now.
    fresh_sub = await world.delegate(orch, await world.agent(SUB))
    assert_status(await world.call(fresh_sub), 200)


async def test_a_delegated_credential_never_outlives_its_parent(world: World) -> None:
    orch = await world.root()
    world.live.clock.advance(orch.claims["exp"] - orch.claims["iat"] - 5)
    sub = await world.delegate(orch, await world.agent(SUB))
    assert sub.claims["exp"] <= orch.claims["exp"]
    world.live.clock.advance(6)
    assert_status(await world.call(sub), 401, "invalid_token")
