"""The demo scenario: a task granted, used and ended, against a live server over HTTP.

Everything goes through the public HTTP API, exactly as an agent and an operator would use
it; only the bootstrap admin token is made directly in the database, as
`taskbound admin init` does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import uvicorn
from rich.console import Console
from rich.panel import Panel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from taskbound.core.dpop import make_dpop_proof
from taskbound.core.keys import PrivateKey, generate_key
from taskbound.service.admin import create_admin_token
from taskbound.service.runtime import Services

AGENT = "spiffe://taskbound.local/agents/triage-bot"


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


class _Agent:
    """What an agent process holds: its identity token and an in-memory DPoP key."""

    def __init__(self, base: str, http: httpx.AsyncClient, identity: str) -> None:
        self.base = base
        self.http = http
        self.identity = identity
        self.key: PrivateKey = generate_key("EdDSA")

    def proof(self, method: str, path: str, access_token: str | None = None) -> str:
        return make_dpop_proof(
            self.key,
            method=method,
            url=self.base + path,
            now=datetime.now(UTC),
            jti=secrets.token_urlsafe(16),
            access_token=access_token,
        )

    async def tool(self, method: str, path: str, credential: str, **kw: Any) -> httpx.Response:
        """A tool call through the gateway: the credential as DPoP, a proof bound to it."""
        headers = {
            "Authorization": f"DPoP {credential}",
            "DPoP": self.proof(method, path, access_token=credential),
        }
        return await self.http.request(method, path, headers=headers, **kw)

    async def call(
        self, method: str, path: str, *, proof: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {self.identity}",
            "DPoP": proof or self.proof(method, path),
        }
        return await self.http.request(method, path, headers=headers, **kw)


class DemoFailed(Exception):
    pass


class Upstream:
    """The demo's issue tracker: a real HTTP service on loopback that records what reaches
    it, so the demo can show what the gateway forwarded."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.base = f"http://127.0.0.1:{self.port}"

    def app(self) -> Starlette:
        async def handle(request: Request) -> JSONResponse:
            self.seen.append(dict(request.headers))
            if request.method == "GET":
                return JSONResponse([{"n": 7, "title": "crash on save"}, {"n": 9, "title": "typo"}])
            return JSONResponse({"ok": True}, status_code=201)

        return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        server = uvicorn.Server(
            uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_config=None)
        )
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():  # noqa: ASYNC110 - a flag, not an event
            await asyncio.sleep(0.01)
        try:
            yield self
        finally:
            server.should_exit = True
            await task


async def run_demo(base: str, services: Services, console: Console | None = None) -> bool:
    """Run the scenario; True when every step behaved as it must."""
    con = console or Console()
    try:
        return await _scenario(base, services, con)
    except (DemoFailed, httpx.HTTPError, KeyError, ValueError) as exc:
        con.print(f"[bold red]demo failed:[/] {exc}")
        return False


async def _scenario(base: str, services: Services, con: Console) -> bool:
    step = 0

    def say(title: str) -> None:
        nonlocal step
        step += 1
        con.print(f"\n[bold cyan]{step}. {title}[/]")

    def ok(text: str) -> None:
        con.print(f"   [green]✓[/] {text}")

    def bad(text: str) -> None:
        con.print(f"   [bold red]✗ {text}[/]")

    con.print(Panel.fit(f"[bold]taskbound demo[/] against {base}", border_style="cyan"))
    admin_token = (await create_admin_token(services.storage, services.clock, "demo")).token
    async with (
        Upstream().running() as upstream,
        httpx.AsyncClient(base_url=base, timeout=10.0) as http,
    ):
        admin = {"Authorization": f"Bearer {admin_token}"}

        say("An admin registers an owner, two tools and an agent (taskbound apply)")
        issues, deploy = await _tool_ids(http, admin, base)
        doc = {
            "owners": [{"id": "alice", "contact": "alice@example.com", "roles": ["approver"]}],
            "tools": [
                {
                    "id": issues,
                    "audience": f"{base}/{issues}",
                    # A real tool, served by the demo on loopback (below).
                    "upstream_url": f"{upstream.base}/api",
                    "kind": "http",
                    "upstream_secret": "demo-upstream-secret-the-agent-never-sees",
                    "actions": [
                        {
                            "name": "list_issues",
                            "tier": "read",
                            "method": "GET",
                            "path": "/repos/{org}/{repo}/issues",
                        },
                        {
                            "name": "comment",
                            "tier": "write",
                            "method": "POST",
                            "path": "/repos/{org}/{repo}/issues/{n}/comments",
                        },
                        {
                            "name": "delete_repo",
                            "tier": "admin",
                            "method": "DELETE",
                            "path": "/repos/{org}/{repo}",
                            "risk": "high",
                            "requires_approval": True,
                        },
                    ],
                },
                {
                    "id": deploy,
                    "audience": f"{base}/{deploy}",
                    "upstream_url": "https://deploy.example.com/api",
                    "kind": "http",
                    "actions": [
                        {"name": "release", "tier": "admin", "method": "POST", "path": "/releases"}
                    ],
                },
            ],
            "agents": [
                {
                    "spiffe_id": AGENT,
                    "owner": "alice",
                    "ceiling": [
                        {"tool": issues, "tier": "read"},
                        {"tool": issues, "tier": "write"},
                    ],
                    "description": "triages bug reports",
                }
            ],
        }
        r = await http.post("/v1/admin/apply", json=doc, headers=admin)
        if r.status_code != 200:
            bad(f"apply failed: {r.text}")
            return False
        res = r.json()
        ok(f"created {', '.join(res['created']) or 'nothing'}; unchanged {len(res['unchanged'])}")
        ok(f"agent {AGENT} may ever request only {issues}:read and {issues}:write")

        say("The agent proves what it is: a JWT-SVID from the development issuer")
        r = await http.post("/v1/admin/dev/identity", json={"spiffe_id": AGENT}, headers=admin)
        agent = _Agent(base, http, r.json()["token"])
        ok(f"identity for {AGENT} (no shared secret); DPoP key generated in memory")

        say("The agent starts a task: triage acme/web, asking for more than it may have")
        body = {
            "intent": {
                "purpose": "triage new bug reports in acme/web",
                # The default policy pack binds calls to these, and grants writes only
                # when the intent names them.
                "constraints": {"org": "acme", "repo": "web", "tiers": ["read", "write"]},
            },
            "on_behalf_of": "alice",
            "scopes": [
                {"tool": issues, "tier": "read"},
                {"tool": issues, "tier": "write", "actions": ["comment"]},
                {"tool": deploy, "tier": "admin"},
            ],
            "ttl_seconds": 900,
        }
        r = await agent.call("POST", "/v1/tasks", json=body)
        if r.status_code != 201:
            bad(f"task refused: {r.text}")
            return False
        task = r.json()
        ok(f"task {task['id']} is {task['state']}, expires {task['expires_at']}")
        for g in task["granted"]:
            ok(f"granted [bold]{g['tool']}:{g['tier']}[/] actions {', '.join(g['actions'])}")
        for d in task["denied"]:
            con.print(
                f"   [yellow]–[/] denied {d['tool']}:{d['tier']}: {d['code']} ({d['reason']})"
            )

        say("One credential per (tool, tier): one audience, one tier, bound to the agent's key")
        creds = task["credentials"]
        for c in creds:
            claims = _claims(c["access_token"])
            ok(
                f"{c['scope']:14} aud={claims['aud']}  exp in {c['expires_in']}s  "
                f"cnf.jkt={claims['cnf']['jkt'][:12]}…  jti={claims['jti'][:14]}…"
            )
        if any("demo-upstream-secret" in c["access_token"] for c in creds):
            bad("an upstream secret leaked into a credential")
            return False
        ok("no upstream secret in anything the agent received")

        say("A resource server checks a credential (RFC 7662 introspection)")
        read_token = next(c["access_token"] for c in creds if c["tier"] == "read")
        r = await http.post("/oauth/introspect", data={"token": read_token}, headers=admin)
        info = r.json()
        if not info.get("active"):
            bad(f"credential not active: {info}")
            return False
        ok(f"active=true scope={info['scope']} task={info['tsk']} intent={info['intent']!r}")

        say("The agent calls the tool through the gateway")
        write_token = next(c["access_token"] for c in creds if c["tier"] == "write")
        r = await agent.tool("GET", f"/{issues}/repos/acme/web/issues", read_token)
        if r.status_code != 200:
            bad(f"allowed call refused: {r.text}")
            return False
        ok(f"GET /issues/repos/acme/web/issues -> 200, {len(r.json())} issues")
        seen = upstream.seen[-1]
        injected = seen.get("authorization", "")
        if "dpop" in seen or read_token in str(seen) or not injected.startswith("demo-upstream"):
            bad("the upstream saw the agent's credential or not its own secret")
            return False
        ok(f"the upstream got its own secret ({injected[:16]}…), never the agent's credential")
        r = await agent.tool(
            "POST",
            f"/{issues}/repos/acme/web/issues/7/comments",
            write_token,
            json={"body": "dup of #3"},
        )
        if r.status_code != 201:
            bad(f"allowed comment refused: {r.text}")
            return False
        ok("POST a comment with the write credential -> 201")
        r = await agent.tool("GET", f"/{issues}/repos/acme/payroll/issues", read_token)
        _expect(con, r, 403, "a call outside the task's constraint (repo payroll)")
        r = await agent.tool("GET", f"/{issues}/repos/acme/web/issues", write_token)
        _expect(con, r, 403, "the write credential used for a read (tiers never mix)")
        r = await agent.tool("DELETE", f"/{issues}/repos/acme/web", read_token)
        _expect(con, r, 403, "an admin action no credential covers")

        say("Attacks that must fail")
        path = "/v1/tasks"
        replayed = agent.proof("POST", path)
        await agent.call("POST", path, json=body, proof=replayed)
        r = await agent.call("POST", path, json=body, proof=replayed)
        _expect(con, r, 401, "a replayed DPoP proof")
        thief = _Agent(base, http, agent.identity)
        r = await thief.call(
            "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": issues, "tier": "read"}
        )
        _expect(con, r, 404, "a fresh credential asked with another DPoP key")
        r = await agent.call(
            "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": deploy, "tier": "admin"}
        )
        _expect(con, r, 403, "a credential for a scope the task was never granted")

        say("The agent refreshes a credential while the task lives")
        r = await agent.call(
            "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": issues, "tier": "read"}
        )
        if r.status_code != 201:
            bad(f"refresh failed: {r.text}")
            return False
        fresh = r.json()["access_token"]
        ok(f"fresh {r.json()['scope']} credential, same key")

        say("The agent ends the task: everything issued for it dies")
        r = await agent.call("POST", f"/v1/tasks/{task['id']}/complete")
        ended = r.json()
        ok(f"task {ended['id']} is {ended['state']}")
        for token in [c["access_token"] for c in creds] + [fresh]:
            r = await http.post("/oauth/introspect", data={"token": token}, headers=admin)
            if r.json().get("active") is not False:
                bad("a credential is still active after the task ended")
                return False
        ok(f"all {len(creds) + 1} credentials now introspect as active=false")
        r = await agent.tool("GET", f"/{issues}/repos/acme/web/issues", read_token)
        _expect(con, r, 401, "a tool call with a credential of the ended task")
        r = await agent.call(
            "POST", f"/v1/tasks/{task['id']}/credentials", json={"tool": issues, "tier": "read"}
        )
        _expect(con, r, 409, "a new credential for the ended task")

        say("An admin suspends the agent: its live tasks die at once, at every gateway")
        r = await agent.call("POST", "/v1/tasks", json=body)
        if r.status_code != 201:
            bad(f"second task refused: {r.text}")
            return False
        second = r.json()
        read2 = next(c["access_token"] for c in second["credentials"] if c["tier"] == "read")
        r = await agent.tool("GET", f"/{issues}/repos/acme/web/issues", read2)
        if r.status_code != 200:
            bad(f"allowed call refused: {r.text}")
            return False
        ok(f"a second task {second['id']} works: GET issues -> 200")
        agent_path = f"/v1/admin/agents/{quote(AGENT, safe='')}"
        r = await http.get("/v1/admin/revocations", params={"limit": 1}, headers=admin)
        before = r.json()["feed"]["seq"]
        r = await http.post(
            f"{agent_path}/suspend", json={"reason": "demo: unusual activity"}, headers=admin
        )
        if r.status_code != 200 or r.json()["state"] != "suspended":
            bad(f"suspend failed: {r.text}")
            return False
        ok(f"agent {AGENT} suspended")
        r = await agent.tool("GET", f"/{issues}/repos/acme/web/issues", read2)
        _expect(con, r, 401, "a call of the suspended agent's live task")
        r = await agent.call("POST", "/v1/tasks", json=body)
        _expect(con, r, 403, "a new task for the suspended agent")
        r = await http.get("/v1/admin/revocations", params={"after": before}, headers=admin)
        for e in r.json()["revocations"]:
            ok(f"revocation log #{e['seq']}: {e['kind']} {e['subject']} by {e['cause']}")
        r = await http.post(f"{agent_path}/resume", headers=admin)
        ok(f"agent resumed ({r.json()['state']}); the revoked task stays revoked")

        say("The audit trail: one hash chain, checkpointed and verified")
        r = await http.post("/v1/admin/audit/checkpoints", headers=admin)
        if r.status_code != 201:
            bad(f"checkpoint failed: {r.text}")
            return False
        ok(f"checkpoint signed over record #{r.json()['seq']}")
        r = await http.get("/v1/admin/audit/verify", headers=admin)
        report = r.json()
        if r.status_code != 200 or not report["ok"]:
            bad(f"the audit chain does not verify: {r.text}")
            return False
        ok(
            f"{report['records']} audit records verify, head {report['head'][:16]}…, "
            f"{report['checkpoints']} checkpoint(s)"
        )
        con.print(
            f"  people decide approvals and break-glass at {base}/ui/ "
            "(give someone a password: [bold]taskbound ui set-password alice[/])"
        )

    con.print(
        Panel.fit(
            "[bold green]demo complete[/]: granted, used, ended, revoked", border_style="green"
        )
    )
    return True


async def _tool_ids(http: httpx.AsyncClient, admin: dict[str, str], base: str) -> tuple[str, str]:
    """The demo's tool ids. A data directory that already holds the demo's tools for
    another base URL keeps them (a tool's audience never moves), so this run uses ids of
    its own."""
    r = await http.get("/v1/admin/tools/issues", headers=admin)
    if r.status_code != 200 or r.json().get("audience") == f"{base}/issues":
        return "issues", "deploy"
    suffix = hashlib.sha256(base.encode()).hexdigest()[:6]
    return f"issues-{suffix}", f"deploy-{suffix}"


def _expect(con: Console, r: httpx.Response, status: int, what: str) -> None:
    body = r.json() if r.content else {}
    code = body.get("code") or body.get("error")
    if r.status_code == status:
        con.print(f"   [green]✓[/] refused {what}: {r.status_code} {code}")
    else:
        con.print(f"   [bold red]✗ {what} got {r.status_code} {code}, expected {status}[/]")
        raise DemoFailed(f"expectation failed: {what}")
