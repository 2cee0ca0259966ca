"""The demo scenario: the whole story of a task, against a live server over HTTP.

An admin registers an owner, two agents and the tools (an HTTP issue tracker and, when the
``mcp`` package is installed, an MCP tracker, both served by the demo on loopback). The
agent's code uses the SDK exactly as an agent would: it starts a task, calls the tools
through the gateway, is refused what its intent does not cover, waits for a person's
approval of a risky call, delegates a narrower credential to a sub-agent, and ends the
task by leaving its ``async with`` block — after which every credential is dead. Then an
admin suspends the agent, and the audit chain is checkpointed and verified.

Everything goes through the public HTTP API; only the bootstrap admin token is made
directly in the database, as ``taskbound admin init`` does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable
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
from taskbound.sdk import ApprovalRequired, Client, DevIssuer, Refused, Task
from taskbound.service.admin import create_admin_token
from taskbound.service.runtime import Services

AGENT = "spiffe://taskbound.local/agents/triage-bot"
SUBAGENT = "spiffe://taskbound.local/agents/summariser"
INTENT = {"org": "acme", "repo": "web", "project": "WEB", "tiers": ["read", "write"]}


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


class _Thief:
    """Someone holding the agent's identity token but not its task's DPoP key."""

    def __init__(self, base: str, http: httpx.AsyncClient, identity: str) -> None:
        self.base, self.http, self.identity = base, http, identity
        self.key: PrivateKey = generate_key("EdDSA")

    def proof(self, method: str, path: str) -> str:
        return make_dpop_proof(
            self.key,
            method=method,
            url=self.base + path,
            now=datetime.now(UTC),
            jti=secrets.token_urlsafe(16),
        )

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """The demo's tools: a real HTTP issue tracker on loopback that records what reaches
    it (so the demo can show what the gateway forwarded), and an MCP tracker built with the
    official MCP SDK when it is installed."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.mcp_calls: list[str] = []
        self.port, self.mcp_port = _free_port(), _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.mcp_base: str | None = None

    def app(self) -> Starlette:
        async def handle(request: Request) -> JSONResponse:
            self.seen.append(dict(request.headers))
            if request.method == "GET":
                return JSONResponse([{"n": 7, "title": "crash on save"}, {"n": 9, "title": "typo"}])
            if request.method == "PUT":
                return JSONResponse({"merged": True})
            return JSONResponse({"ok": True}, status_code=201)

        return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST", "PUT"])])

    def mcp_app(self) -> Any | None:
        try:
            from mcp.server.mcpserver import MCPServer
        except ImportError:
            return None
        server = MCPServer("tracker")

        @server.tool()
        def search(project: str, query: str = "") -> str:
            """Search the issues of a project."""
            self.mcp_calls.append(f"search {project} {query}")
            return f"2 issues in {project} matching {query!r}: #7 crash on save, #9 typo"

        return server.streamable_http_app(stateless_http=True)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        apps: list[tuple[Any, int]] = [(self.app(), self.port)]
        mcp_app = self.mcp_app()
        if mcp_app is not None:
            apps.append((mcp_app, self.mcp_port))
            self.mcp_base = f"http://127.0.0.1:{self.mcp_port}/mcp"
        servers = []
        for app, port in apps:
            server = uvicorn.Server(
                uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
            )
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():  # noqa: ASYNC110 - a flag
                await asyncio.sleep(0.01)
            servers.append((server, task))
        try:
            yield self
        finally:
            for server, task in servers:
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await task


async def run_demo(base: str, services: Services, console: Console | None = None) -> bool:
    """Run the scenario; True when every step behaved as it must."""
    con = console or Console()
    try:
        return await _scenario(base, services, con)
    except (DemoFailed, httpx.HTTPError, KeyError, ValueError, Refused) as exc:
        con.print(f"[bold red]demo failed:[/] {exc}")
        return False


class _Say:
    def __init__(self, con: Console) -> None:
        self.con, self.step = con, 0

    def __call__(self, title: str) -> None:
        self.step += 1
        self.con.print(f"\n[bold cyan]{self.step}. {title}[/]")

    def ok(self, text: str) -> None:
        self.con.print(f"   [green]✓[/] {text}")

    def note(self, text: str) -> None:
        self.con.print(f"   [yellow]–[/] {text}")

    def fail(self, text: str) -> DemoFailed:
        self.con.print(f"   [bold red]✗ {text}[/]")
        return DemoFailed(text)

    async def refused(self, what: str, call: Awaitable[Any], status: int) -> Refused:
        """``call`` must be refused by taskbound with ``status``."""
        try:
            answer = await call
        except Refused as err:
            if err.status != status:
                raise self.fail(f"{what} got {err.status} {err.code}, expected {status}") from None
            self.ok(f"refused {what}: {err.status} {err.code}")
            return err
        raise self.fail(f"{what} was not refused: {answer!r}")

    def expect(self, r: httpx.Response, status: int, what: str) -> None:
        body = r.json() if r.content else {}
        code = body.get("code") or body.get("error")
        if r.status_code != status:
            raise self.fail(f"{what} got {r.status_code} {code}, expected {status}")
        self.ok(f"refused {what}: {r.status_code} {code}")


async def _scenario(base: str, services: Services, con: Console) -> bool:
    say = _Say(con)
    con.print(Panel.fit(f"[bold]taskbound demo[/] against {base}", border_style="cyan"))
    admin_token = (await create_admin_token(services.storage, services.clock, "demo")).token
    admin = {"Authorization": f"Bearer {admin_token}"}
    async with (
        Upstream().running() as upstream,
        httpx.AsyncClient(base_url=base, timeout=10.0) as http,
    ):
        say("An admin registers owners, tools and agents (taskbound apply)")
        ids = await _tool_ids(http, admin, base)
        r = await http.post("/v1/admin/apply", json=_registry(base, upstream, ids), headers=admin)
        if r.status_code != 200:
            raise say.fail(f"apply failed: {r.text}")
        res = r.json()
        say.ok(
            f"created {', '.join(res['created']) or 'nothing'}; unchanged {len(res['unchanged'])}"
        )
        issues, tracker, deploy = ids["issues"], ids["tracker"], ids["deploy"]
        say.ok(f"{AGENT} may ever request only {issues}:read, {issues}:write, {tracker}:read")
        if upstream.mcp_base is None:
            say.note("no MCP tool: install the mcp package (pip install 'taskbound[mcp]')")

        say("The agent proves what it is: a JWT-SVID from the development issuer")
        identity = DevIssuer(base, admin_token, AGENT, http=http)
        agent = Client(base, identity=identity, http=http)
        say.ok(f"identity for {AGENT} (no shared secret); a DPoP key per task, in memory only")

        say("The agent's code starts a task, asking for more than it may have")
        scopes: list[Any] = [
            (issues, "read"),
            {"tool": issues, "tier": "write", "actions": ["comment", "merge"]},
            (deploy, "admin"),
        ]
        if upstream.mcp_base is not None:
            scopes.append((tracker, "read"))
        async with agent.task(
            "triage new bug reports in acme/web",
            on_behalf_of="alice",
            scopes=scopes,
            constraints=INTENT,
            ttl_seconds=900,
            may_act=SUBAGENT,
        ) as task:
            say.ok(f"task {task.id} is {task.info['state']}, expires {task.info['expires_at']}")
            for g in task.granted:
                say.ok(
                    f"granted [bold]{g['tool']}:{g['tier']}[/] actions {', '.join(g['actions'])}"
                )
            for d in task.denied:
                say.note(f"denied {d['tool']}:{d['tier']}: {d['code']} ({d['reason']})")
            tokens = await _credentials(say, task, http, admin)
            await _calls(say, task, upstream, issues, tokens)
            if upstream.mcp_base is not None:
                await _mcp(say, task, upstream, tracker)
            await _approval(say, task, http, admin, issues)
            await _attacks(say, task, http, base, identity, issues, deploy)
            delegated = await _delegation(say, task, http, admin, base, issues)
            say("The agent refreshes a credential while the task lives")
            fresh = await task.refresh(issues, "read")
            say.ok(f"fresh {fresh.tool}:{fresh.tier} credential {fresh.jti[:14]}…, same key")
            tokens.append(fresh.access_token)
            after_end = task.http(issues, "read")
        await _ended(say, task, http, admin, [*tokens, delegated], after_end, issues)
        await _suspension(say, agent, http, admin, issues)
        await _audit(say, http, admin)
        con.print(
            f"  people decide approvals and break-glass at {base}/ui/ "
            "(give someone a password: [bold]taskbound ui set-password bob[/])"
        )
    con.print(
        Panel.fit(
            "[bold green]demo complete[/]: granted, used, approved, delegated, ended, revoked",
            border_style="green",
        )
    )
    return True


def _registry(base: str, upstream: Upstream, ids: dict[str, str]) -> dict[str, Any]:
    issues, tracker, deploy = ids["issues"], ids["tracker"], ids["deploy"]
    tools: list[dict[str, Any]] = [
        {
            "id": issues,
            "audience": f"{base}/{issues}",
            # A real tool, served by the demo on loopback.
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
                    # Risky: every call waits for a person's approval of exactly that call.
                    "name": "merge",
                    "tier": "write",
                    "method": "PUT",
                    "path": "/repos/{org}/{repo}/pulls/{n}/merge",
                    "risk": "high",
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
    ]
    ceiling = [{"tool": issues, "tier": "read"}, {"tool": issues, "tier": "write"}]
    if upstream.mcp_base is not None:
        tools.append(
            {
                "id": tracker,
                "audience": f"{base}/{tracker}",
                "upstream_url": upstream.mcp_base,
                "kind": "mcp",
                "upstream_auth_header": "X-Api-Key",
                "upstream_secret": "demo-tracker-key-the-agent-never-sees",
                "actions": [
                    {
                        "name": "search",
                        "tier": "read",
                        "mcp_tool": "search",
                        "input_schema": {
                            "type": "object",
                            "properties": {
                                "project": {"type": "string"},
                                "query": {"type": "string"},
                            },
                            "required": ["project"],
                        },
                    }
                ],
            }
        )
        ceiling.append({"tool": tracker, "tier": "read"})
    return {
        "owners": [
            {"id": "alice", "contact": "alice@example.com", "roles": ["approver"]},
            {"id": "bob", "contact": "bob@example.com", "roles": ["approver"]},
        ],
        "tools": tools,
        "agents": [
            {
                "spiffe_id": AGENT,
                "owner": "alice",
                "ceiling": ceiling,
                "description": "triages bug reports",
            },
            {
                "spiffe_id": SUBAGENT,
                "owner": "alice",
                "ceiling": [{"tool": issues, "tier": "read"}],
                "description": "summarises issues for the triage bot",
            },
        ],
    }


async def _credentials(
    say: _Say, task: Task, http: httpx.AsyncClient, admin: dict[str, str]
) -> list[str]:
    say("One credential per (tool, tier): one audience, one tier, bound to the task's key")
    tokens = []
    for c in task.credentials():
        claims = _claims(c.access_token)
        say.ok(
            f"{c.tool + ':' + c.tier:14} aud={claims['aud']}  cnf.jkt={claims['cnf']['jkt'][:12]}…"
            f"  jti={claims['jti'][:14]}…"
        )
        if "demo-upstream-secret" in c.access_token or "demo-tracker-key" in c.access_token:
            raise say.fail("an upstream secret leaked into a credential")
        tokens.append(c.access_token)
    say.ok("no upstream secret in anything the agent received")
    say("A resource server checks a credential (RFC 7662 introspection)")
    r = await http.post("/oauth/introspect", data={"token": tokens[0]}, headers=admin)
    info = r.json()
    if not info.get("active"):
        raise say.fail(f"credential not active: {info}")
    say.ok(f"active=true scope={info['scope']} task={info['tsk']} intent={info['intent']!r}")
    return tokens


async def _calls(say: _Say, task: Task, upstream: Upstream, issues: str, tokens: list[str]) -> None:
    say("The agent calls the HTTP tool through the gateway (task.http)")
    async with task.http(issues, "read") as reader, task.http(issues, "write") as writer:
        r = await reader.get("/repos/acme/web/issues")
        if r.status_code != 200:
            raise say.fail(f"allowed call refused: {r.text}")
        say.ok(f"GET /repos/acme/web/issues -> 200, {len(r.json())} issues")
        seen = upstream.seen[-1]
        injected = seen.get("authorization", "")
        if "dpop" in seen or any(t in str(seen) for t in tokens):
            raise say.fail("the upstream saw the agent's credential")
        if not injected.startswith("demo-upstream"):
            raise say.fail("the upstream did not get its own secret")
        say.ok(f"the upstream got its own secret ({injected[:16]}…), never the agent's credential")
        r = await writer.post("/repos/acme/web/issues/7/comments", json={"body": "dup of #3"})
        if r.status_code != 201:
            raise say.fail(f"allowed comment refused: {r.text}")
        say.ok("POST a comment with the write credential -> 201")
        await say.refused(
            "a write outside the intent (repo payroll)",
            writer.post("/repos/acme/payroll/issues/1/comments", json={"body": "hi"}),
            403,
        )
        await say.refused(
            "the write credential used for a read (tiers never mix)",
            writer.get("/repos/acme/web/issues"),
            403,
        )
        await say.refused(
            "an admin action no credential covers",
            reader.request("DELETE", "/repos/acme/web"),
            403,
        )


async def _mcp(say: _Say, task: Task, upstream: Upstream, tracker: str) -> None:
    say("The agent calls the MCP tool with the official MCP client (task.mcp)")
    async with task.mcp(tracker) as session:
        listed = await session.list_tools()
        say.ok(f"tools/list -> {', '.join(t.name for t in listed.tools)}")
        result = await session.call_tool("search", {"project": "WEB", "query": "crash"})
        text = " ".join(getattr(c, "text", "") for c in result.content)
        say.ok(f"tools/call search -> {text}")
        await say.refused(
            "a call outside the intent (project PAY)",
            session.call_tool("search", {"project": "PAY"}),
            403,
        )
    if len(upstream.mcp_calls) != 1:
        raise say.fail("the refused MCP call reached the tool")


async def _approval(
    say: _Say, task: Task, http: httpx.AsyncClient, admin: dict[str, str], issues: str
) -> None:
    say("A risky call waits for a person's approval of exactly that call")
    async with task.http(issues, "write") as writer:
        try:
            r = await writer.put("/repos/acme/web/pulls/7/merge", json={"method": "squash"})
            raise say.fail(f"the merge was not held: {r.status_code}")
        except ApprovalRequired as held:
            say.ok(f"PUT merge -> held: {held.code}, approval {held.approval_id}")
            approval = held
        # Bob looks at the exact call (tool, action, arguments, intent) and approves it,
        # through the approvals service the web page uses.
        r = await http.get(f"/v1/approvals/{approval.approval_id}", headers=admin)
        view = r.json()
        say.ok(
            f"bob sees {view['tool']} {view['action']} on {view['target']} "
            f"for {view['intent']!r}, arguments {view['summary'].get('arguments')}"
        )
        r = await http.post(
            f"/v1/admin/approvals/{approval.approval_id}/approve",
            json={"as_owner": "bob", "reason": "checked the diff"},
            headers=admin,
        )
        if r.status_code != 200:
            raise say.fail(f"approval failed: {r.text}")
        say.ok(f"bob approved ({r.json()['state']})")
        r = await task.retry_when_approved(approval, within=30)
        if r.status_code != 200:
            raise say.fail(f"the approved merge failed: {r.text}")
        say.ok("the agent re-sent the very same call -> 200 merged")
        try:
            await writer.put("/repos/acme/web/pulls/7/merge", json={"method": "squash"})
            raise say.fail("an approval was used twice")
        except ApprovalRequired as again:
            say.ok(f"the same call once more is held again (approval {again.approval_id})")


async def _attacks(
    say: _Say,
    task: Task,
    http: httpx.AsyncClient,
    base: str,
    identity: DevIssuer,
    issues: str,
    deploy: str,
) -> None:
    say("Attacks that must fail")
    thief = _Thief(base, http, await identity.token())
    body = {
        "intent": {"purpose": "x", "constraints": INTENT},
        "on_behalf_of": "alice",
        "scopes": [{"tool": issues, "tier": "read"}],
        "ttl_seconds": 60,
    }
    replayed = thief.proof("POST", "/v1/tasks")
    first = await thief.call("POST", "/v1/tasks", json=body, proof=replayed)
    if first.status_code == 201:
        await thief.call("POST", f"/v1/tasks/{first.json()['id']}/cancel")
    r = await thief.call("POST", "/v1/tasks", json=body, proof=replayed)
    say.expect(r, 401, "a replayed DPoP proof")
    r = await thief.call(
        "POST", f"/v1/tasks/{task.id}/credentials", json={"tool": issues, "tier": "read"}
    )
    say.expect(r, 404, "a fresh credential asked with another DPoP key")
    await say.refused(
        "a credential for a scope the task was never granted", task.refresh(deploy, "admin"), 403
    )


async def _delegation(
    say: _Say, task: Task, http: httpx.AsyncClient, admin: dict[str, str], base: str, issues: str
) -> str:
    say("The agent delegates a narrower credential to a sub-agent (RFC 8693)")
    handoff = await task.delegate(issues, "read", actions=["list_issues"])
    # The hand-over carries the credential and a consent proof, never the parent's key.
    sub = Client(
        base, identity=DevIssuer(base, _admin_token(admin), SUBAGENT, http=http), http=http
    )
    delegated = await sub.accept(handoff.to_json())
    claims = _claims(delegated.credentials()[0].access_token)
    say.ok(
        f"{SUBAGENT} holds {delegated.details['tool']}:{delegated.details['tier']} "
        f"actions {', '.join(delegated.details['actions'])}; act.sub={claims['act']['sub']}"
    )
    if delegated.jkt == task.jkt:
        raise say.fail("the sub-agent's credential is bound to the parent's key")
    say.ok(f"bound to the sub-agent's own key ({delegated.jkt[:12]}…), not the parent's")
    async with delegated.http(issues) as sub_http:
        r = await sub_http.get("/repos/acme/web/issues")
        if r.status_code != 200:
            raise say.fail(f"the delegated call failed: {r.text}")
        say.ok("the sub-agent lists the issues -> 200")
    return delegated.credentials()[0].access_token


def _admin_token(admin: dict[str, str]) -> str:
    return admin["Authorization"].removeprefix("Bearer ")


async def _ended(
    say: _Say,
    task: Task,
    http: httpx.AsyncClient,
    admin: dict[str, str],
    tokens: list[str],
    after_end: httpx.AsyncClient,
    issues: str,
) -> None:
    say("The agent's code leaves its `async with` block: the task ends, and all it issued dies")
    state = await task.state()
    say.ok(f"task {task.id} is {state['state']}")
    for token in tokens:
        r = await http.post("/oauth/introspect", data={"token": token}, headers=admin)
        if r.json().get("active") is not False:
            raise say.fail("a credential is still active after the task ended")
    say.ok(f"all {len(tokens)} credentials (the delegated one too) introspect as active=false")
    async with after_end:
        await say.refused(
            "a tool call with a credential of the ended task",
            after_end.get("/repos/acme/web/issues"),
            401,
        )
    await say.refused("a new credential for the ended task", task.refresh(issues, "read"), 409)


async def _suspension(
    say: _Say, agent: Client, http: httpx.AsyncClient, admin: dict[str, str], issues: str
) -> None:
    say("An admin suspends the agent: its live tasks die at once, at every gateway")
    second = await agent.start_task(
        "triage again", on_behalf_of="alice", scopes=[(issues, "read")], constraints=INTENT
    )
    async with second.http(issues) as reader:
        r = await reader.get("/repos/acme/web/issues")
        if r.status_code != 200:
            raise say.fail(f"allowed call refused: {r.text}")
        say.ok(f"a second task {second.id} works: GET issues -> 200")
        agent_path = f"/v1/admin/agents/{quote(AGENT, safe='')}"
        r = await http.get("/v1/admin/revocations", params={"limit": 1}, headers=admin)
        before = r.json()["feed"]["seq"]
        r = await http.post(
            f"{agent_path}/suspend", json={"reason": "demo: unusual activity"}, headers=admin
        )
        if r.status_code != 200 or r.json()["state"] != "suspended":
            raise say.fail(f"suspend failed: {r.text}")
        say.ok(f"agent {AGENT} suspended")
        await say.refused(
            "a call of the suspended agent's live task", reader.get("/repos/acme/web/issues"), 401
        )
    await say.refused(
        "a new task for the suspended agent",
        agent.start_task("x", on_behalf_of="alice", scopes=[(issues, "read")], constraints=INTENT),
        403,
    )
    r = await http.get("/v1/admin/revocations", params={"after": before}, headers=admin)
    for e in r.json()["revocations"]:
        say.ok(f"revocation log #{e['seq']}: {e['kind']} {e['subject']} by {e['cause']}")
    r = await http.post(f"{agent_path}/resume", headers=admin)
    say.ok(f"agent resumed ({r.json()['state']}); the revoked task stays revoked")


async def _audit(say: _Say, http: httpx.AsyncClient, admin: dict[str, str]) -> None:
    say("The audit trail: one hash chain, checkpointed and verified")
    r = await http.post("/v1/admin/audit/checkpoints", headers=admin)
    if r.status_code != 201:
        raise say.fail(f"checkpoint failed: {r.text}")
    say.ok(f"checkpoint signed over record #{r.json()['seq']}")
    r = await http.get("/v1/admin/audit/verify", headers=admin)
    report = r.json()
    if r.status_code != 200 or not report["ok"]:
        raise say.fail(f"the audit chain does not verify: {r.text}")
    say.ok(
        f"{report['records']} audit records verify, head {report['head'][:16]}…, "
        f"{report['checkpoints']} checkpoint(s)"
    )


async def _tool_ids(http: httpx.AsyncClient, admin: dict[str, str], base: str) -> dict[str, str]:
    """The demo's tool ids. A data directory that already holds the demo's tools for
    another base URL keeps them (a tool's audience never moves), so this run uses ids of
    its own."""
    names = ("issues", "tracker", "deploy")
    r = await http.get("/v1/admin/tools/issues", headers=admin)
    if r.status_code != 200 or r.json().get("audience") == f"{base}/issues":
        return {n: n for n in names}
    suffix = hashlib.sha256(base.encode()).hexdigest()[:6]
    return {n: f"{n}-{suffix}" for n in names}
