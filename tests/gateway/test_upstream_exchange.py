"""Per-task upstream credentials: a tool with an `upstream_exchange` gets, for each task,
its own token from the upstream's authorization server by RFC 8693 token exchange with a
Txn-Token as the subject token. A fake authorization server on loopback checks the client
authentication and verifies the Txn-Token against our published keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from taskbound.core.clock import FakeClock
from taskbound.core.keys import KeyRing
from taskbound.core.model import AgentState
from taskbound.core.txn import TXN_TOKEN_TYPE, InvalidTxnToken, verify_txn_token
from tests.api.conftest import AGENT, Agent, make_settings, start_live

from .conftest import Echo, World, call_headers, echo_app, free_port, serve

CLIENT_ID = "taskbound gateway"  # a space: form-encoded before the Basic encoding
CLIENT_SECRET = "s3cret:with/odd+chars"
AS_AUDIENCE = "https://crm.example"
STATIC = "Bearer a-static-secret-that-must-never-be-sent"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@dataclass
class FakeAS:
    """The upstream's authorization server: RFC 8693 token exchange, client_secret_basic,
    the subject token verified against taskbound's published Txn-Token keys."""

    jwks_url: str
    issuer: str
    clock: FakeClock
    base: str = ""
    mode: str = "ok"  # "ok" | "refuse" | "garbage" | "dpop"
    expires_in: int = 300
    delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    issued: dict[str, dict[str, Any]] = field(default_factory=dict)

    def app(self) -> Starlette:
        async def token(request: Request) -> JSONResponse:
            form = dict(await request.form())
            self.requests.append(
                {"form": form, "authorization": request.headers.get("authorization")}
            )
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme != "Basic":
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            client_id, _, secret = base64.b64decode(value).decode().partition(":")
            if (unquote_plus(client_id), unquote_plus(secret)) != (CLIENT_ID, CLIENT_SECRET):
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            if self.mode == "refuse":
                return JSONResponse({"error": "access_denied"}, status_code=403)
            if (
                form.get("grant_type") != GRANT
                or form.get("subject_token_type") != TXN_TOKEN_TYPE
                or form.get("audience") != AS_AUDIENCE
                or form.get("requested_token_type") != ACCESS
            ):
                return JSONResponse({"error": "invalid_request"}, status_code=400)
            async with httpx.AsyncClient() as http:
                keys = KeyRing.from_jwks((await http.get(self.jwks_url)).json())
            try:
                subject = verify_txn_token(
                    str(form["subject_token"]),
                    keys=keys,
                    issuer=self.issuer,
                    audience=AS_AUDIENCE,
                    algorithms=("EdDSA",),
                    now=self.clock.now(),
                    leeway=timedelta(seconds=5),
                )
            except InvalidTxnToken as exc:
                return JSONResponse(
                    {"error": "invalid_grant", "error_description": exc.internal}, status_code=400
                )
            await asyncio.sleep(self.delay)
            if self.mode == "garbage":
                return JSONResponse({"token_type": "Bearer", "expires_in": 60})
            opaque = "up-" + secrets.token_urlsafe(12)
            self.issued[opaque] = {
                "sub": subject.subject,
                "txn": subject.txn,
                "task": subject.tctx["task"],
                "scope": form.get("scope"),
            }
            return JSONResponse(
                {
                    "access_token": opaque,
                    "token_type": "DPoP" if self.mode == "dpop" else "Bearer",
                    "expires_in": self.expires_in,
                    "issued_token_type": ACCESS,
                },
                headers={"Cache-Control": "no-store"},
            )

        return Starlette(routes=[Route("/token", token, methods=["POST"])])


def crm_tool(gateway: str, echo: str, endpoint: str, **extra: Any) -> dict[str, Any]:
    exchange = {
        "token_endpoint": endpoint,
        "audience": AS_AUDIENCE,
        "scope": "crm.read crm.write",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    tool: dict[str, Any] = {
        "id": "crm",
        "audience": f"{gateway}/crm",
        "upstream_url": f"{echo}/crm",
        "kind": "http",
        "upstream_exchange": exchange,
        "actions": [
            {"name": "get_account", "tier": "read", "method": "GET", "path": "/accounts/{id}"},
            {"name": "add_note", "tier": "write", "method": "POST", "path": "/accounts/{id}/notes"},
        ],
    }
    tool.update(extra)
    return tool


@dataclass
class ExchangeWorld(World):
    auth: FakeAS = field(default=None)  # type: ignore[assignment]

    async def call(self, agent: Agent, token: str, account: str = "42") -> httpx.Response:
        path = f"/crm/accounts/{account}"
        return await self.live.http.get(path, headers=call_headers(agent, token, "GET", path))

    async def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.live.http.request(method, path, headers=self.live.admin, **kw)

    def upstream_authorization(self, i: int = -1) -> str:
        return str(self.echo.seen[i]["headers"].get("authorization"))


@pytest.fixture
async def xworld(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ExchangeWorld]:
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    as_port = free_port()
    servers = [await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))]
    settings = make_settings(tmp_path)
    try:
        async for live in start_live(settings, clock, registry=False):
            auth = FakeAS(f"{live.base}/.well-known/txn-jwks.json", live.base, clock)
            auth.base = f"http://127.0.0.1:{as_port}"
            servers.append(await serve(auth.app(), as_port))
            doc = {
                "owners": [{"id": "alice", "contact": "alice@example.com"}],
                "tools": [crm_tool(live.base, echo.base, f"{auth.base}/token")],
                "agents": [
                    {
                        "spiffe_id": AGENT,
                        "owner": "alice",
                        "ceiling": [
                            {"tool": "crm", "tier": "read"},
                            {"tool": "crm", "tier": "write"},
                        ],
                    }
                ],
            }
            r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
            assert r.status_code == 200, r.text
            yield ExchangeWorld(live, echo, [], auth)
    finally:
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task


async def test_each_task_gets_its_own_upstream_token(xworld: ExchangeWorld) -> None:
    world = xworld
    agent_a, a = await world.task(("crm", "read"))
    agent_b, b = await world.task(("crm", "read"))
    for agent, t in ((agent_a, a), (agent_b, b)):
        r = await world.call(agent, t["creds"]["crm:read"])
        assert r.status_code == 200, r.text
    first, second = world.upstream_authorization(0), world.upstream_authorization(1)
    assert first.startswith("Bearer up-")
    assert second.startswith("Bearer up-")
    assert first != second
    for header, t in ((first, a), (second, b)):
        grant = world.auth.issued[header.removeprefix("Bearer ")]
        assert grant == {
            "sub": AGENT,
            "txn": t["task"]["id"],
            "task": t["task"]["id"],
            "scope": "crm.read crm.write",
        }
    # Client authentication is client_secret_basic, nothing else in the form.
    assert all("client_secret" not in r["form"] for r in world.auth.requests)
    assert all(r["authorization"].startswith("Basic ") for r in world.auth.requests)
    # The agent never sees the upstream token, the client secret or a Txn-Token.
    seen = world.echo.seen
    assert all(CLIENT_SECRET not in str(s) for s in seen)
    assert all("txn-token" in s["headers"] for s in seen)


async def test_the_same_task_reuses_its_token_until_near_expiry(
    xworld: ExchangeWorld, clock: FakeClock
) -> None:
    world = xworld
    world.auth.expires_in = 120
    agent, t = await world.task(("crm", "read"))
    token = t["creds"]["crm:read"]
    for account in ("1", "2", "3"):
        assert (await world.call(agent, token, account)).status_code == 200
    assert len(world.auth.requests) == 1
    assert len({world.upstream_authorization(i) for i in range(3)}) == 1
    clock.advance(120 - 30 - 1)  # still before expiry minus the margin
    assert (await world.call(agent, token)).status_code == 200
    assert len(world.auth.requests) == 1
    clock.advance(2)
    assert (await world.call(agent, token)).status_code == 200
    assert len(world.auth.requests) == 2
    assert world.upstream_authorization(-1) != world.upstream_authorization(0)


async def test_concurrent_calls_of_a_task_share_one_exchange(xworld: ExchangeWorld) -> None:
    world = xworld
    world.auth.delay = 0.3  # every call arrives while the first exchange is under way
    agent, t = await world.task(("crm", "read"))
    token = t["creds"]["crm:read"]
    answers = await asyncio.gather(*(world.call(agent, token, str(n)) for n in range(5)))
    assert [r.status_code for r in answers] == [200] * 5
    assert len(world.auth.requests) == 1
    assert len({world.upstream_authorization(i) for i in range(5)}) == 1


async def test_tiers_and_tasks_never_share_a_token(xworld: ExchangeWorld) -> None:
    world = xworld
    agent, t = await world.task(("crm", "read"), ("crm", "write"))
    assert (await world.call(agent, t["creds"]["crm:read"])).status_code == 200
    path = "/crm/accounts/42/notes"
    write = t["creds"]["crm:write"]
    r = await world.live.http.post(
        path, json={"note": "hi"}, headers=call_headers(agent, write, "POST", path)
    )
    assert r.status_code == 200, r.text
    assert world.upstream_authorization(0) != world.upstream_authorization(1)
    assert len(world.auth.requests) == 2


async def test_the_static_secret_is_never_sent(xworld: ExchangeWorld) -> None:
    world = xworld
    tool = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    tool["upstream_exchange"] = None
    tool["upstream_secret"] = STATIC
    r = await world.admin("PUT", "/v1/admin/tools/crm", json=tool)
    assert r.status_code == 200, r.text
    back = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    r = await world.admin("PUT", "/v1/admin/tools/crm", json=back)
    assert r.status_code == 200, r.text
    assert r.json()["has_upstream_secret"] is False
    agent, t = await world.task(("crm", "read"))
    assert (await world.call(agent, t["creds"]["crm:read"])).status_code == 200
    (seen,) = world.echo.seen
    assert seen["headers"]["authorization"].startswith("Bearer up-")
    assert all(STATIC not in v for v in seen["headers"].values())
    assert all(STATIC not in str(r) for r in world.auth.requests)


async def test_authorization_server_down_refuses_and_audits(xworld: ExchangeWorld) -> None:
    world = xworld
    closed = f"http://127.0.0.1:{free_port()}/token"
    r = await world.admin(
        "PUT", "/v1/admin/tools/crm", json=crm_tool(world.live.base, world.echo.base, closed)
    )
    assert r.status_code == 200, r.text
    agent, t = await world.task(("crm", "read"))
    r = await world.call(agent, t["creds"]["crm:read"])
    assert r.status_code == 502
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "upstream_credential_unavailable"
    assert world.echo.seen == []  # never forwarded without a credential
    (event,) = [
        e
        for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])
        if e.event == "gateway.call"
    ]
    assert (event.decision, event.code, event.txn) == (
        "deny",
        "upstream_credential_unavailable",
        t["task"]["id"],
    )
    assert "cannot be reached: ConnectError" in (event.detail or "")
    assert CLIENT_SECRET not in (event.detail or "")


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("refuse", "refused: HTTP 403, access_denied"),
        ("garbage", "access_token is missing"),
        ("dpop", "issued a 'DPoP' token"),
    ],
)
async def test_authorization_server_refusing_refuses_the_call(
    xworld: ExchangeWorld, mode: str, reason: str
) -> None:
    world = xworld
    world.auth.mode = mode
    agent, t = await world.task(("crm", "read"))
    r = await world.call(agent, t["creds"]["crm:read"])
    assert (r.status_code, r.json()["code"]) == (502, "upstream_credential_unavailable")
    assert world.echo.seen == []
    (event,) = [
        e
        for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])
        if e.event == "gateway.call"
    ]
    assert event.code == "upstream_credential_unavailable"
    assert reason in (event.detail or "")
    # Nothing was cached: once the server answers, the same task gets its token.
    world.auth.mode = "ok"
    assert (await world.call(agent, t["creds"]["crm:read"])).status_code == 200


async def test_a_wrong_client_secret_is_refused_by_the_server(xworld: ExchangeWorld) -> None:
    world = xworld
    tool = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    tool["upstream_exchange"]["client_secret"] = "not-the-secret"
    assert (await world.admin("PUT", "/v1/admin/tools/crm", json=tool)).status_code == 200
    agent, t = await world.task(("crm", "read"))
    r = await world.call(agent, t["creds"]["crm:read"])
    assert (r.status_code, r.json()["code"]) == (502, "upstream_credential_unavailable")
    assert world.echo.seen == []


async def test_a_subject_token_for_another_audience_is_refused(xworld: ExchangeWorld) -> None:
    """The authorization server's own check: the subject Txn-Token names its audience."""
    world = xworld
    tool = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    tool["upstream_exchange"]["audience"] = "https://other.example"
    assert (await world.admin("PUT", "/v1/admin/tools/crm", json=tool)).status_code == 200
    agent, t = await world.task(("crm", "read"))
    r = await world.call(agent, t["creds"]["crm:read"])
    assert (r.status_code, r.json()["code"]) == (502, "upstream_credential_unavailable")
    (event,) = [
        e
        for _, e in await world.live.services.storage.list_audit(task=t["task"]["id"])
        if e.event == "gateway.call"
    ]
    assert "HTTP 400, invalid_request" in (event.detail or "")


async def test_ending_the_task_forgets_its_token(xworld: ExchangeWorld) -> None:
    world = xworld
    agent, t = await world.task(("crm", "read"))
    assert (await world.call(agent, t["creds"]["crm:read"])).status_code == 200
    gateway_tokens = _gateway_tokens(world)
    assert len(gateway_tokens) == 1
    r = await agent.call("POST", f"/v1/tasks/{t['task']['id']}/complete")
    assert r.status_code == 200, r.text
    assert len(gateway_tokens) == 0
    # And an agent leaving the active state drops the tokens of its tasks.
    agent2, t2 = await world.task(("crm", "read"))
    assert (await world.call(agent2, t2["creds"]["crm:read"])).status_code == 200
    assert len(gateway_tokens) == 1
    await world.live.services.registry.set_agent_state(
        AGENT, AgentState.SUSPENDED, cause="test", reason="incident"
    )
    assert len(gateway_tokens) == 0


async def test_a_changed_tool_forgets_its_tokens(xworld: ExchangeWorld) -> None:
    world = xworld
    agent, t = await world.task(("crm", "read"))
    token = t["creds"]["crm:read"]
    assert (await world.call(agent, token)).status_code == 200
    assert (await world.call(agent, token)).status_code == 200
    assert len(world.auth.requests) == 1
    same = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    del same["upstream_exchange"]["client_secret"]
    assert (await world.admin("PUT", "/v1/admin/tools/crm", json=same)).status_code == 200
    assert (await world.call(agent, token)).status_code == 200
    assert len(world.auth.requests) == 2


def _gateway_tokens(world: ExchangeWorld) -> Any:
    """The running gateway's upstream token cache (found through the event subscribers)."""
    from taskbound.gateway.app import Gateway

    for fn in world.live.services.events._subscribers:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, Gateway):
            return owner.upstream_tokens
    raise AssertionError("no gateway subscribed")


# --- registry validation --------------------------------------------------------------


async def test_a_tool_has_one_kind_of_upstream_credential(xworld: ExchangeWorld) -> None:
    world = xworld
    both = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token", id="both")
    both["audience"] = f"{world.live.base}/both"
    both["upstream_secret"] = STATIC
    r = await world.admin("POST", "/v1/admin/tools", json=both)
    assert r.status_code in (400, 422), r.text
    assert "either an upstream_secret or an upstream_exchange" in r.text
    assert STATIC not in r.text
    assert CLIENT_SECRET not in r.text


@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("http://crm-as.example/token", False),
        ("http://10.0.0.7/token", False),
        ("ftp://127.0.0.1/token", False),
        ("https://user:pw@crm-as.example/token", False),
        ("https://crm-as.example/token", True),
        ("http://127.0.0.1:9/token", True),
        ("http://localhost:9/token", True),
        ("http://[::1]:9/token", True),
    ],
)
async def test_token_endpoint_must_be_https_except_on_loopback(
    xworld: ExchangeWorld, endpoint: str, ok: bool
) -> None:
    world = xworld
    tool = crm_tool(world.live.base, world.echo.base, endpoint, id="other")
    tool["audience"] = f"{world.live.base}/other"
    r = await world.admin("POST", "/v1/admin/tools", json=tool)
    if ok:
        assert r.status_code == 201, r.text
    else:
        assert r.status_code in (400, 422), r.text
        assert "token_endpoint" in r.text


async def test_the_client_secret_is_write_only_and_required_when_it_must_be(
    xworld: ExchangeWorld,
) -> None:
    world = xworld
    r = await world.admin("GET", "/v1/admin/tools/crm")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["has_upstream_secret"] is False
    assert view["upstream_exchange"] == {
        "token_endpoint": f"{world.auth.base}/token",
        "audience": AS_AUDIENCE,
        "scope": "crm.read crm.write",
        "client_id": CLIENT_ID,
        "has_client_secret": True,
    }
    assert CLIENT_SECRET not in r.text
    # A new tool with an exchange needs its client secret.
    fresh = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token", id="fresh")
    fresh["audience"] = f"{world.live.base}/fresh"
    del fresh["upstream_exchange"]["client_secret"]
    r = await world.admin("POST", "/v1/admin/tools", json=fresh)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    assert "client_secret is required" in r.text
    # Keeping the endpoint and client id, the stored secret is kept.
    same = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    del same["upstream_exchange"]["client_secret"]
    r = await world.admin("PUT", "/v1/admin/tools/crm", json=same)
    assert r.status_code == 200, r.text
    agent, t = await world.task(("crm", "read"))
    assert (await world.call(agent, t["creds"]["crm:read"])).status_code == 200
    # Another endpoint: the secret must be given again (it is bound to the endpoint).
    moved = crm_tool(world.live.base, world.echo.base, "https://elsewhere.example/token")
    del moved["upstream_exchange"]["client_secret"]
    r = await world.admin("PUT", "/v1/admin/tools/crm", json=moved)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    # Leaving the exchange without a static secret would leave the client secret behind.
    plain = crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")
    plain["upstream_exchange"] = None
    r = await world.admin("PUT", "/v1/admin/tools/crm", json=plain)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    # Re-applying the same document (secret included) converges.
    doc = {"tools": [crm_tool(world.live.base, world.echo.base, f"{world.auth.base}/token")]}
    r = await world.admin("POST", "/v1/admin/apply", json=doc)
    assert r.status_code == 200, r.text
    doc["tools"][0]["upstream_exchange"].pop("client_secret")
    r = await world.admin("POST", "/v1/admin/apply", json=doc)
    assert r.json()["unchanged"] == ["tool/crm"]


async def test_the_gateways_header_is_not_a_secret_header(xworld: ExchangeWorld) -> None:
    world = xworld
    tool = crm_tool(
        world.live.base,
        world.echo.base,
        f"{world.auth.base}/token",
        upstream_auth_header="Txn-Token",
    )
    r = await world.admin("PUT", "/v1/admin/tools/crm", json=tool)
    assert r.status_code in (400, 422), r.text
    assert "set by the gateway itself" in r.text
