"""Delegation by RFC 8693 token exchange, end to end on SQLite and PostgreSQL (DESIGN.md §3
flow 6): a three-hop chain (orchestrator → sub → subsub) calling a real upstream through
the gateway, each hop narrower than its parent; every attempt to widen or to exchange
without the right proofs refused with the RFC error, audited, and nothing issued; revoking
the root, ending the task or suspending a delegate kills the chain below it at the gateway;
the chain visible in introspection and in the gateway's audit; 50 concurrent exchanges of
one credential, single use and not; and an independent OAuth client doing the exchange."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client

from taskbound.core.clock import FakeClock
from taskbound.core.keys import generate_key, jwk_thumbprint, public_jwk
from taskbound.core.model import AuditEvent
from taskbound.core.tokens import mint_credential, verify_credential
from tests.api.conftest import Agent, Live, free_port, make_settings, start_live
from tests.gateway.conftest import UPSTREAM_SECRET, Echo, call_headers, echo_app, serve
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

ORCH = "spiffe://taskbound.local/agents/orchestrator"
SUB = "spiffe://taskbound.local/agents/sub"
SUBSUB = "spiffe://taskbound.local/agents/subsub"
LEAF = "spiffe://taskbound.local/agents/leaf"
NARROW = "spiffe://taskbound.local/agents/narrow"  # its ceiling lacks issues:read
GHOST = "spiffe://taskbound.local/agents/ghost"  # never registered

TOKEN = "/oauth/token"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"


def list_path(repo: str = "web", org: str = "acme") -> str:
    return f"/issues/repos/{org}/{repo}/issues"


def get_path(repo: str = "web") -> str:
    return f"/issues/repos/acme/{repo}/issues/7"


def comment_path(repo: str = "web") -> str:
    return f"/issues/repos/acme/{repo}/issues/7/comments"


def registry(echo_base: str, gateway_base: str) -> dict[str, Any]:
    issues_rw = [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}]
    return {
        "owners": [{"id": "alice", "contact": "alice@example.com", "roles": ["approver"]}],
        "tools": [
            {
                "id": "issues",
                "audience": f"{gateway_base}/issues",
                "upstream_url": f"{echo_base}/api",
                "kind": "http",
                "upstream_secret": UPSTREAM_SECRET,
                "actions": [
                    {
                        "name": "list",
                        "tier": "read",
                        "method": "GET",
                        "path": "/repos/{org}/{repo}/issues",
                    },
                    {
                        "name": "get",
                        "tier": "read",
                        "method": "GET",
                        "path": "/repos/{org}/{repo}/issues/{n}",
                    },
                    {
                        "name": "comment",
                        "tier": "write",
                        "method": "POST",
                        "path": "/repos/{org}/{repo}/issues/{n}/comments",
                    },
                ],
            },
            {
                "id": "wiki",
                "audience": f"{gateway_base}/wiki",
                "upstream_url": f"{echo_base}/wiki",
                "kind": "http",
                "actions": [{"name": "page", "tier": "read", "method": "GET", "path": "/p/{p}"}],
            },
        ],
        "agents": [
            {"spiffe_id": ORCH, "owner": "alice", "ceiling": issues_rw},
            {"spiffe_id": SUB, "owner": "alice", "ceiling": issues_rw},
            {"spiffe_id": SUBSUB, "owner": "alice", "ceiling": issues_rw},
            {"spiffe_id": LEAF, "owner": "alice", "ceiling": issues_rw},
            {"spiffe_id": NARROW, "owner": "alice", "ceiling": [issues_rw[1]]},
        ],
    }


def payload(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verified it; the test reads it)."""
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@dataclass
class Hop:
    """One link of a chain: the agent holding a credential, with the key it is bound to."""

    agent: Agent
    token: str

    @property
    def claims(self) -> dict[str, Any]:
        return payload(self.token)

    @property
    def jti(self) -> str:
        return str(self.claims["jti"])

    @property
    def task(self) -> str:
        return str(self.claims["tsk"])


DEFAULT = object()  # "build the usual proof" for a parameter that may also be omitted


@dataclass
class World:
    live: Live
    echo: Echo

    # --- agents and tasks -----------------------------------------------------------------

    async def agent(self, spiffe_id: str) -> Agent:
        return await self.live.agent(spiffe_id)

    async def root(self, spiffe_id: str = ORCH, *, tiers: tuple[str, ...] = ("read",)) -> Hop:
        """A task of ``spiffe_id`` for acme/{web,api}; its issues credential of the first tier."""
        agent = await self.agent(spiffe_id)
        r = await agent.start(
            intent={
                "purpose": "triage acme issues",
                "constraints": {"org": "acme", "repo": ["web", "api"], "tiers": list(tiers)},
            },
            scopes=[{"tool": "issues", "tier": t} for t in tiers],
        )
        assert r.status_code == 201, r.text
        (cred,) = [c for c in r.json()["credentials"] if c["tier"] == tiers[0]]
        return Hop(agent, cred["access_token"])

    # --- the exchange ---------------------------------------------------------------------

    def form(self, parent: Hop, delegate: Agent, **params: Any) -> dict[str, Any]:
        """A token exchange request by ``delegate`` for ``parent``'s credential; ``params``
        add or replace parameters (None leaves one out)."""
        form: dict[str, Any] = {
            "grant_type": EXCHANGE,
            "subject_token": parent.token,
            "subject_token_type": ACCESS_TOKEN,
            "subject_dpop": parent.agent.proof("POST", TOKEN, access_token=parent.token),
            "actor_token": delegate.identity,
            "actor_token_type": JWT,
        }
        form.update(params)
        return {k: v for k, v in form.items() if v is not None}

    async def exchange(
        self, parent: Hop, delegate: Agent, *, dpop: Any = DEFAULT, **params: Any
    ) -> httpx.Response:
        """POST /oauth/token; ``dpop`` is the DPoP header(s): the delegate's proof by
        default, a string, a list of strings, or None for none."""
        if dpop is DEFAULT:
            dpop = delegate.proof("POST", TOKEN)
        headers = [
            ("DPoP", p) for p in ([] if dpop is None else [dpop] if isinstance(dpop, str) else dpop)
        ]
        return await self.live.http.post(
            TOKEN, data=self.form(parent, delegate, **params), headers=headers
        )

    async def delegate(self, parent: Hop, delegate: Agent, **params: Any) -> Hop:
        r = await self.exchange(parent, delegate, **params)
        assert r.status_code == 200, r.text
        return Hop(delegate, r.json()["access_token"])

    # --- the gateway ----------------------------------------------------------------------

    async def call(
        self, hop: Hop, method: str = "GET", path: str | None = None, key: Agent | None = None
    ) -> httpx.Response:
        """Call the issues tool with ``hop``'s credential, proving ``key`` (its own)."""
        path = path or list_path()
        extra: dict[str, Any] = {"json": {"body": "hello"}} if method == "POST" else {}
        return await self.live.http.request(
            method, path, headers=call_headers(key or hop.agent, hop.token, method, path), **extra
        )

    # --- what the server recorded ---------------------------------------------------------

    async def introspect(self, hop: Hop) -> dict[str, Any]:
        r = await self.live.http.post(
            "/oauth/introspect", data={"token": hop.token}, headers=self.live.admin
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def credentials(self, task_id: str) -> list[dict[str, Any]]:
        r = await self.live.http.get(
            f"/v1/admin/tasks/{task_id}/credentials", headers=self.live.admin
        )
        assert r.status_code == 200, r.text
        return list(r.json()["credentials"])

    async def audit(self, after: int = 0) -> list[tuple[int, AuditEvent]]:
        out: list[tuple[int, AuditEvent]] = []
        while True:
            page = await self.live.services.storage.list_audit(after=after, limit=1000)
            out += page
            if len(page) < 1000:
                return out
            after = page[-1][0]

    async def audit_seq(self) -> int:
        events = await self.audit()
        return events[-1][0] if events else 0

    async def refused(
        self,
        error: str,
        task_id: str,
        parent: Hop,
        delegate: Agent,
        *,
        dpop: Any = DEFAULT,
        **params: Any,
    ) -> AuditEvent:
        """Exchange as :meth:`exchange` does; check it was refused with ``error`` (RFC 6749
        §5.2), that no credential was added to the task and that one deny was audited."""
        rows = await self.credentials(task_id)
        seq = await self.audit_seq()
        r = await self.exchange(parent, delegate, dpop=dpop, **params)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["error"] == error, body
        assert isinstance(body.get("error_description"), str)
        assert "access_token" not in body
        assert r.headers["cache-control"] == "no-store"
        assert await self.credentials(task_id) == rows, "a credential was issued"
        new = [e for _, e in await self.audit(seq)]
        assert [(e.event, e.decision, e.code) for e in new] == [
            ("token.exchange", "deny", error)
        ], new
        assert new[0].detail, "the audit carries the full reason"
        return new[0]


@contextlib.asynccontextmanager
async def open_world(
    backend: str, tmp_path: Path, clock: FakeClock, **sections: dict[str, Any]
) -> AsyncIterator[World]:
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    server, task = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))
    try:
        with contextlib.ExitStack() as stack:
            if backend == "postgres":
                url = stack.enter_context(postgres_schema(postgres_url()))
            else:
                url = f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
            settings = make_settings(tmp_path, storage={"url": url}, **sections)
            # aclosing: a failing test still stops the server and closes its storage now.
            async with contextlib.aclosing(start_live(settings, clock, registry=False)) as lives:
                async for live in lives:
                    doc = registry(echo.base, live.base)
                    r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
                    assert r.status_code == 200, r.text
                    yield World(live, echo)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def world(backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[World]:
    async with open_world(backend, tmp_path, clock) as w:
        yield w


def assert_status(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["code"] == code, r.text


async def chain(world: World) -> tuple[Hop, Hop, Hop]:
    """orchestrator (read: list, get; acme/{web,api}) → sub (list only) → subsub (list
    only, acme/web only)."""
    orch = await world.root()
    sub = await world.delegate(orch, await world.agent(SUB), scope="list")
    details = [{"type": "taskbound_tool", "constraints": {"repo": "web"}}]
    subsub = await world.delegate(
        sub, await world.agent(SUBSUB), authorization_details=json.dumps(details)
    )
    return orch, sub, subsub


# --- the chain ---------------------------------------------------------------------------


async def test_a_three_hop_chain_narrows_at_every_hop(world: World) -> None:
    orch = await world.root()
    assert orch.claims["authorization_details"][0]["actions"] == ["list", "get"]
    # The orchestrator: reads of acme/web and acme/api; no writes (another tier).
    assert_status(await world.call(orch), 200)
    assert_status(await world.call(orch, path=get_path("api")), 200)
    assert_status(await world.call(orch, "POST", comment_path()), 403, "insufficient_scope")

    # Hop 1: the sub-agent gets `list` only.
    sub_agent = await world.agent(SUB)
    r = await world.exchange(orch, sub_agent, scope="list")
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["cache-control"] == "no-store"
    assert (body["issued_token_type"], body["token_type"], body["scope"]) == (
        ACCESS_TOKEN,
        "DPoP",
        "issues:read",
    )
    assert body["authorization_details"] == [
        {
            "type": "taskbound_tool",
            "tool": "issues",
            "tier": "read",
            "actions": ["list"],
            "constraints": {"org": "acme", "repo": ["web", "api"], "tiers": ["read"]},
        }
    ]
    assert 0 < body["expires_in"] <= orch.claims["exp"] - orch.claims["iat"]
    sub = Hop(sub_agent, body["access_token"])
    c = sub.claims
    assert (c["sub"], c["client_id"], c["aud"]) == (ORCH, SUB, orch.claims["aud"])
    assert (c["act"], c["tb_parents"], c["tsk"], c["txn"]) == (
        {"sub": SUB},
        [orch.jti],
        orch.task,
        orch.task,
    )
    assert c["cnf"]["jkt"] == jwk_thumbprint(public_jwk(sub_agent.key))
    assert c["exp"] <= orch.claims["exp"]
    assert_status(await world.call(sub), 200)
    assert_status(await world.call(sub, path=list_path("api")), 200)
    assert_status(await world.call(sub, path=get_path()), 403, "insufficient_scope")
    assert_status(await world.call(sub, "POST", comment_path()), 403, "insufficient_scope")
    # Bound to the sub-agent's key: the orchestrator cannot use it, nor the reverse.
    assert_status(await world.call(sub, key=orch.agent), 401)
    assert_status(await world.call(orch, key=sub_agent), 401)

    # Hop 2: the sub-sub-agent keeps `list`, on acme/web only.
    subsub_agent = await world.agent(SUBSUB)
    details = [{"type": "taskbound_tool", "constraints": {"repo": "web"}}]
    r = await world.exchange(sub, subsub_agent, authorization_details=json.dumps(details))
    assert r.status_code == 200, r.text
    assert r.json()["authorization_details"][0]["constraints"] == {
        "org": "acme",
        "repo": "web",
        "tiers": ["read"],
    }
    subsub = Hop(subsub_agent, r.json()["access_token"])
    c = subsub.claims
    assert (c["sub"], c["client_id"], c["act"], c["tb_parents"], c["txn"]) == (
        ORCH,
        SUBSUB,
        {"sub": SUBSUB, "act": {"sub": SUB}},
        [sub.jti, orch.jti],
        orch.task,
    )
    assert c["authorization_details"][0]["actions"] == ["list"]
    assert c["exp"] <= sub.claims["exp"]
    seen = len(world.echo.seen)
    assert_status(await world.call(subsub), 200)
    assert_status(await world.call(subsub, path=list_path("api")), 403, "policy_denied")
    assert_status(await world.call(subsub, path=list_path("web", "evil")), 403, "policy_denied")
    assert_status(await world.call(subsub, path=get_path()), 403, "insufficient_scope")
    assert len(world.echo.seen) == seen + 1  # the refused calls never reached the upstream
    (last,) = world.echo.seen[-1:]
    assert last["headers"]["authorization"] == UPSTREAM_SECRET
    assert all(subsub.token not in v for v in last["headers"].values())
    # The parents are untouched by their children's narrowing.
    assert_status(await world.call(sub, path=list_path("api")), 200)
    assert_status(await world.call(orch, path=get_path("api")), 200)

    # Three credentials under the task, two exchanges audited as allowed.
    rows = await world.credentials(orch.task)
    assert {r["jti"] for r in rows} == {orch.jti, sub.jti, subsub.jti}
    by_jti = {r["jti"]: r for r in rows}
    assert by_jti[sub.jti]["actions"] == ["list"]
    assert by_jti[subsub.jti]["actions"] == ["list"]
    storage = world.live.services.storage
    assert (await storage.get_credential(sub.jti)).parent_jti == orch.jti  # type: ignore[union-attr]
    assert (await storage.get_credential(subsub.jti)).parent_jti == sub.jti  # type: ignore[union-attr]
    exchanges = [e for _, e in await world.audit() if e.event == "token.exchange"]
    assert [(e.decision, e.agent, e.task, e.txn) for e in exchanges] == [
        ("allow", SUB, orch.task, orch.task),
        ("allow", SUBSUB, orch.task, orch.task),
    ]
    assert [e.jti for e in exchanges] == [sub.jti, subsub.jti]


async def test_the_chain_is_visible_in_introspection_and_the_audit(world: World) -> None:
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)

    r = await world.live.http.post(
        "/oauth/introspect", data={"token": subsub.token}, headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["active"] is True
    assert (info["sub"], info["client_id"], info["jti"]) == (ORCH, SUBSUB, subsub.jti)
    assert info["act"] == {"sub": SUBSUB, "act": {"sub": SUB}}  # current actor outermost
    assert info["txn"] == orch.task
    assert info["cnf"] == {"jkt": jwk_thumbprint(public_jwk(subsub.agent.key))}
    assert info["authorization_details"][0]["actions"] == ["list"]
    assert info["authorization_details"][0]["constraints"]["repo"] == "web"
    r = await world.live.http.post(
        "/oauth/introspect", data={"token": orch.token}, headers=world.live.admin
    )
    assert r.json()["active"] is True
    assert "act" not in r.json()
    # Introspection needs an admin.
    r = await world.live.http.post("/oauth/introspect", data={"token": subsub.token})
    assert r.status_code == 401

    # Every gateway record of the three hops carries the task's transaction id.
    calls = [e for _, e in await world.audit() if e.event == "gateway.call"]
    assert {e.jti for e in calls} == {orch.jti, sub.jti, subsub.jti}
    assert {e.txn for e in calls} == {orch.task}
    assert {e.task for e in calls} == {orch.task}


# --- widening and bad requests: refused, audited, nothing issued -------------------------


async def test_no_exchange_widens_the_credential(world: World) -> None:
    base = world.live.base
    orch = await world.root()
    sub = await world.delegate(orch, await world.agent(SUB), scope="list")
    subsub = await world.agent(SUBSUB)
    task = orch.task

    def details(**entry: Any) -> str:
        return json.dumps([{"type": "taskbound_tool", **entry}])

    cases: list[tuple[str, Hop, dict[str, Any]]] = [
        # another destination
        ("invalid_target", sub, {"resource": f"{base}/wiki"}),
        ("invalid_target", sub, {"resource": "https://elsewhere.example/issues"}),
        ("invalid_target", sub, {"audience": "wiki"}),
        ("invalid_target", sub, {"audience": ["issues", f"{base}/wiki"]}),
        ("invalid_target", sub, {"resource": [f"{base}/issues", f"{base}/wiki"]}),
        ("invalid_target", sub, {"authorization_details": details(tool="wiki")}),
        # another tier or tool
        ("invalid_scope", sub, {"scope": "issues:write"}),
        ("invalid_scope", sub, {"scope": "issues:admin list"}),
        ("invalid_scope", sub, {"scope": "wiki:read"}),
        ("invalid_scope", sub, {"authorization_details": details(tier="write")}),
        # more actions than the parent
        ("invalid_scope", sub, {"scope": "list get"}),
        ("invalid_scope", sub, {"scope": "issues:read get"}),
        ("invalid_scope", orch, {"scope": "comment"}),
        ("invalid_scope", sub, {"authorization_details": details(actions=["list", "get"])}),
        # wider constraints
        ("invalid_scope", sub, {"authorization_details": details(constraints={"org": "evil"})}),
        (
            "invalid_scope",
            sub,
            {"authorization_details": details(constraints={"repo": ["web", "secret"]})},
        ),
        ("invalid_scope", sub, {"authorization_details": details(constraints={"repo": "cli"})}),
        (
            "invalid_scope",
            sub,
            {"authorization_details": details(constraints={"tiers": ["read", "write"]})},
        ),
        # malformed requests for a narrower one
        ("invalid_request", sub, {"authorization_details": "{not json"}),
        ("invalid_request", sub, {"authorization_details": details(colour="red")}),
    ]
    for error, parent, params in cases:
        event = await world.refused(error, task, parent, subsub, **params)
        # The audit names the task, its transaction, the parent credential and the delegate.
        assert (event.task, event.txn, event.jti, event.agent) == (
            task,
            task,
            parent.jti,
            SUBSUB,
        ), params
    # Refused before the subject is even read.
    for params in ({"requested_token_type": JWT}, {"subject_token_type": JWT}):
        await world.refused("invalid_request", task, sub, subsub, **params)
    # Nothing was spent: the same parent still delegates a narrower credential.
    narrower = await world.delegate(sub, subsub, resource=f"{base}/issues", audience="issues")
    assert_status(await world.call(narrower), 200)


async def test_the_delegate_needs_the_tool_and_tier_in_its_ceiling(world: World) -> None:
    orch = await world.root()
    event = await world.refused("invalid_scope", orch.task, orch, await world.agent(NARROW))
    assert event.agent == NARROW


async def test_chain_rules(world: World) -> None:
    orch, sub, subsub = await chain(world)
    task = orch.task
    # An agent already in the chain (the task's own, a delegate, itself) cannot join again.
    for parent, actor in ((orch, ORCH), (sub, ORCH), (subsub, SUB), (subsub, SUBSUB)):
        await world.refused("invalid_grant", task, parent, await world.agent(actor))
    # Depth 3 is the default maximum: one more hop works, the next does not.
    leaf = await world.delegate(subsub, await world.agent(LEAF))
    assert leaf.claims["act"] == {"sub": LEAF, "act": {"sub": SUBSUB, "act": {"sub": SUB}}}
    assert_status(await world.call(leaf), 200)
    event = await world.refused("invalid_grant", task, leaf, sub.agent)
    assert "depth" in (event.detail or "")


async def test_a_lower_max_depth_is_enforced(
    backend: str, tmp_path: Path, clock: FakeClock
) -> None:
    async with open_world(backend, tmp_path, clock, delegation={"max_depth": 1}) as world:
        orch = await world.root()
        sub = await world.delegate(orch, await world.agent(SUB))
        event = await world.refused("invalid_grant", orch.task, sub, await world.agent(SUBSUB))
        assert "depth" in (event.detail or "")


async def test_may_act_admits_only_the_named_actor(world: World) -> None:
    # The agent names the one delegate when it starts the task (RFC 8693 §4.4); every
    # credential of the task carries it, a refreshed one too.
    agent = await world.agent(ORCH)
    r = await agent.start(
        intent={"purpose": "triage", "constraints": {"org": "acme", "repo": ["web"]}},
        scopes=[{"tool": "issues", "tier": "read"}],
        may_act=SUB,
    )
    assert r.status_code == 201, r.text
    assert r.json()["may_act"] == SUB
    only_sub = Hop(agent, r.json()["credentials"][0]["access_token"])
    assert only_sub.claims["may_act"] == {"sub": SUB}
    event = await world.refused("invalid_grant", only_sub.task, only_sub, await world.agent(SUBSUB))
    assert "may_act" in (event.detail or "")
    sub = await world.delegate(only_sub, await world.agent(SUB))
    assert_status(await world.call(sub), 200)
    fresh = await agent.call(
        "POST", f"/v1/tasks/{only_sub.task}/credentials", json={"tool": "issues", "tier": "read"}
    )
    assert fresh.status_code == 201, fresh.text
    refreshed = Hop(agent, fresh.json()["access_token"])
    assert refreshed.claims["may_act"] == {"sub": SUB}
    await world.refused("invalid_grant", only_sub.task, refreshed, await world.agent(SUBSUB))
    bad = await agent.start(
        intent={"purpose": "triage"},
        scopes=[{"tool": "issues", "tier": "read"}],
        may_act="not a spiffe id",
    )
    assert bad.status_code == 400, bad.text


async def test_the_subject_must_be_live_and_its_holder_consent(
    world: World, clock: FakeClock
) -> None:
    orch = await world.root()
    sub_agent = await world.agent(SUB)
    task = orch.task
    other = generate_key("EdDSA")

    def consent(**kw: Any) -> str:
        return orch.agent.proof("POST", TOKEN, **kw)

    # The parent's consent: missing, by another key, for another token, for another URL.
    for subject_dpop in (
        None,
        "",
        "not.a.proof",
        Agent(world.live, orch.agent.identity, other).proof("POST", TOKEN, access_token=orch.token),
        sub_agent.proof("POST", TOKEN, access_token=orch.token),
        consent(access_token=orch.token + "x"),
        consent(),  # no ath at all
        orch.agent.proof("POST", "/v1/tasks", access_token=orch.token),
        orch.agent.proof("GET", TOKEN, access_token=orch.token),
    ):
        await world.refused("invalid_request", task, orch, sub_agent, subject_dpop=subject_dpop)
    # A consent is used once.
    once = consent(access_token=orch.token)
    await world.delegate(orch, sub_agent, subject_dpop=once)
    await world.refused("invalid_dpop_proof", task, orch, sub_agent, subject_dpop=once)

    # Not a taskbound credential: an identity token, garbage, a credential we did not sign.
    services = world.live.services
    claims = verify_credential(
        orch.token,
        keys=services.keys.keyring(),
        issuer=services.settings.issuer,
        audiences={orch.claims["aud"]},
        algorithms=(services.keys.signer().alg,),
        now=clock.now(),
        leeway=timedelta(seconds=30),
    )
    forged = mint_credential(claims, generate_key("EdDSA"))
    for token in (sub_agent.identity, "garbage", forged, orch.token[:-4] + "AAAA"):
        fake = Hop(orch.agent, token)
        await world.refused("invalid_request", task, fake, sub_agent)

    # Revoked.
    sub = await world.delegate(orch, sub_agent)
    r = await world.live.http.post(
        f"/v1/admin/credentials/{sub.jti}/revoke", headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    await world.refused("invalid_request", task, sub, await world.agent(SUBSUB))

    # Expired (a fresh identity for the delegate: only the subject is stale).
    clock.advance(orch.claims["exp"] - orch.claims["iat"] + 120)
    late = await world.agent(SUB)
    event = await world.refused("invalid_request", task, orch, late)
    assert "exp" in (event.detail or ""), event.detail


async def test_the_subject_dies_with_its_task(world: World) -> None:
    orch = await world.root()
    r = await orch.agent.call("POST", f"/v1/tasks/{orch.task}/complete")
    assert r.status_code == 200, r.text
    await world.refused("invalid_request", orch.task, orch, await world.agent(SUB))


async def test_the_actor_must_be_an_active_registered_agent(world: World) -> None:
    orch = await world.root()
    task = orch.task
    sub_agent = await world.agent(SUB)
    ghost = await world.agent(GHOST)
    event = await world.refused("invalid_request", task, orch, ghost)
    assert GHOST in (event.detail or "")
    for params in (
        {"actor_token": None},
        {"actor_token": "garbage"},
        {"actor_token": orch.token},  # a credential is not an identity
        {"actor_token_type": None},
        {"actor_token_type": ACCESS_TOKEN},
    ):
        await world.refused("invalid_request", task, orch, sub_agent, **params)
    # Suspended.
    leaf = await world.agent(LEAF)
    r = await world.live.http.post(
        f"/v1/admin/agents/{quote(LEAF, safe='')}/suspend", headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    await world.refused("invalid_request", task, orch, leaf)


async def test_the_delegate_must_prove_its_key(world: World) -> None:
    orch = await world.root()
    task = orch.task
    sub_agent = await world.agent(SUB)
    used = sub_agent.proof("POST", TOKEN)
    for dpop in (
        None,
        "garbage",
        [sub_agent.proof("POST", TOKEN), sub_agent.proof("POST", TOKEN)],
        sub_agent.proof("GET", TOKEN),
        sub_agent.proof("POST", "/v1/tasks"),
    ):
        await world.refused("invalid_dpop_proof", task, orch, sub_agent, dpop=dpop)
    await world.delegate(orch, sub_agent, dpop=used)
    await world.refused("invalid_dpop_proof", task, orch, sub_agent, dpop=used)


async def test_other_grant_types_are_not_supported(world: World) -> None:
    orch = await world.root()
    rows = await world.credentials(orch.task)
    sub_agent = await world.agent(SUB)
    for grant, error in (
        ("client_credentials", "unsupported_grant_type"),
        ("authorization_code", "unsupported_grant_type"),
        # RFC 6749 §5.2: a missing required parameter is invalid_request.
        (None, "invalid_request"),
    ):
        r = await world.exchange(orch, sub_agent, grant_type=grant)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == error
        assert "access_token" not in r.json()
    assert await world.credentials(orch.task) == rows
    # Malformed requests are audited too (DESIGN.md invariant 6).
    refused = [
        e
        for _, e in await world.live.services.storage.list_audit(limit=1000)
        if e.event == "token.exchange" and e.code in ("unsupported_grant_type", "invalid_request")
    ]
    assert len(refused) >= 3


# --- revocation of chains ----------------------------------------------------------------


async def test_revoking_the_root_kills_the_chain(world: World) -> None:
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)
    r = await world.live.http.post(
        f"/v1/admin/credentials/{orch.jti}/revoke", headers=world.live.admin
    )
    assert (r.status_code, r.json()["changed"]) == (200, True)
    seen = len(world.echo.seen)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 401, "invalid_token")
    assert len(world.echo.seen) == seen
    rows = {r["jti"]: r for r in await world.credentials(orch.task)}
    assert all(rows[h.jti]["revoked_at"] is not None for h in (orch, sub, subsub))
    assert [(await world.introspect(h))["active"] for h in (orch, sub, subsub)] == [False] * 3


async def test_revoking_a_middle_link_kills_only_what_is_below(world: World) -> None:
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)
    r = await world.live.http.post(
        f"/v1/admin/credentials/{sub.jti}/revoke", headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    assert_status(await world.call(sub), 401, "invalid_token")
    assert_status(await world.call(subsub), 401, "invalid_token")
    assert_status(await world.call(orch), 200)


async def test_ending_the_task_kills_the_chain(world: World) -> None:
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)
    r = await orch.agent.call("POST", f"/v1/tasks/{orch.task}/complete")
    assert r.status_code == 200, r.text
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 401, "invalid_token")


async def test_suspending_a_delegate_kills_its_part_of_the_chain(world: World) -> None:
    orch, sub, subsub = await chain(world)
    for hop in (orch, sub, subsub):
        assert_status(await world.call(hop), 200)
    r = await world.live.http.post(
        f"/v1/admin/agents/{quote(SUB, safe='')}/suspend", headers=world.live.admin
    )
    assert (r.status_code, r.json()["changed"]) == (200, True)
    assert_status(await world.call(sub), 401, "invalid_token")
    assert_status(await world.call(subsub), 401, "invalid_token")
    assert_status(await world.call(orch), 200)
    rows = {r["jti"]: r for r in await world.credentials(orch.task)}
    assert rows[orch.jti]["revoked_at"] is None
    assert rows[sub.jti]["revoked_at"] is not None
    assert rows[subsub.jti]["revoked_at"] is not None
    assert (await world.introspect(subsub))["active"] is False
    assert (await world.introspect(orch))["active"] is True
    # Resuming it does not bring its credentials back.
    r = await world.live.http.post(
        f"/v1/admin/agents/{quote(SUB, safe='')}/resume", headers=world.live.admin
    )
    assert r.status_code == 200, r.text
    assert_status(await world.call(sub), 401, "invalid_token")
    assert_status(await world.call(subsub), 401, "invalid_token")


# --- concurrency -------------------------------------------------------------------------

CONCURRENT = 50


@pytest.mark.parametrize("single_use", [True, False], ids=["single-use", "reusable"])
async def test_concurrent_exchanges_of_one_credential(
    backend: str, tmp_path: Path, clock: FakeClock, single_use: bool
) -> None:
    async with open_world(backend, tmp_path, clock, delegation={"single_use": single_use}) as world:
        orch = await world.root()
        sub_agent = await world.agent(SUB)
        seq = await world.audit_seq()
        # Every request brings its own two proofs, as 50 real delegates would.
        responses = await asyncio.gather(
            *(world.exchange(orch, sub_agent) for _ in range(CONCURRENT))
        )
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        rows = await world.credentials(orch.task)
        children = {r["jti"] for r in rows} - {orch.jti}
        exchanges = [e for _, e in await world.audit(seq) if e.event == "token.exchange"]
        if single_use:
            assert len(ok) == 1, [r.text for r in responses]
            assert [(r.status_code, r.json()["error"]) for r in refused] == [
                (400, "invalid_grant")
            ] * (CONCURRENT - 1)
            assert len(children) == 1
            assert sorted(e.decision for e in exchanges) == ["allow"] + ["deny"] * (CONCURRENT - 1)
            # And later ones too.
            await world.refused("invalid_grant", orch.task, orch, sub_agent)
        else:
            assert refused == [], [r.text for r in refused]
            assert len(children) == CONCURRENT
            assert [e.decision for e in exchanges] == ["allow"] * CONCURRENT
        issued = [Hop(sub_agent, r.json()["access_token"]) for r in ok]
        assert {h.jti for h in issued} == children
        storage = world.live.services.storage
        for hop in issued:
            assert (await storage.get_credential(hop.jti)).parent_jti == orch.jti  # type: ignore[union-attr]
        for hop in issued[:5]:
            assert_status(await world.call(hop), 200)


# --- an independent OAuth client ---------------------------------------------------------


async def test_an_independent_oauth_client_performs_the_exchange(world: World) -> None:
    """Authlib's httpx client (RFC 6749 token request, RFC 8693 parameters as extras)."""
    orch = await world.root()
    sub_agent = await world.agent(SUB)
    endpoint = str(world.live.http.base_url.join(TOKEN))
    async with AsyncOAuth2Client(client_id=SUB, token_endpoint_auth_method="none") as client:
        token = await client.fetch_token(
            endpoint,
            grant_type=EXCHANGE,
            subject_token=orch.token,
            subject_token_type=ACCESS_TOKEN,
            subject_dpop=orch.agent.proof("POST", TOKEN, access_token=orch.token),
            actor_token=sub_agent.identity,
            actor_token_type=JWT,
            scope="list",
            headers={"DPoP": sub_agent.proof("POST", TOKEN)},
        )
    assert token["token_type"] == "DPoP"
    assert token["issued_token_type"] == ACCESS_TOKEN
    assert token["scope"] == "issues:read"
    sub = Hop(sub_agent, token["access_token"])
    assert sub.claims["act"] == {"sub": SUB}
    assert_status(await world.call(sub), 200)
    assert_status(await world.call(sub, path=get_path()), 403, "insufficient_scope")

    # Its errors come back as OAuth errors the library understands.
    async with AsyncOAuth2Client(client_id=SUB, token_endpoint_auth_method="none") as client:
        with pytest.raises(Exception, match="invalid_scope") as info:
            await client.fetch_token(
                endpoint,
                grant_type=EXCHANGE,
                subject_token=orch.token,
                subject_token_type=ACCESS_TOKEN,
                subject_dpop=orch.agent.proof("POST", TOKEN, access_token=orch.token),
                actor_token=sub_agent.identity,
                actor_token_type=JWT,
                scope="issues:write",
                headers={"DPoP": sub_agent.proof("POST", TOKEN)},
            )
    assert type(info.value).__name__ == "OAuthError"
    assert len(await world.credentials(orch.task)) == 2
