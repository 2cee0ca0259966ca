"""The approvals service on the in-memory store: holding and consuming calls, separation of
duties, refusals that change nothing and are audited, long polls, and the signed webhook
delivered over real HTTP to a receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskbound.config import Settings, load_settings
from taskbound.core.approvals import SIGNATURE_HEADER, verify_webhook
from taskbound.core.clock import FakeClock, to_epoch
from taskbound.core.model import (
    Agent,
    AgentState,
    Approval,
    ApprovalState,
    Owner,
    Role,
    Scope,
    ScopeGrant,
    Task,
    TaskState,
    Tier,
)
from taskbound.errors import ConfigError, TaskboundError
from taskbound.service.approvals import Approvals, ApprovalWebhook, HeldCall, slack_message
from taskbound.storage import MemoryStorage
from tests.api.conftest import free_port
from tests.gateway.conftest import serve

AGENT = "spiffe://taskbound.local/agents/bot"
DELEGATE = "spiffe://taskbound.local/agents/helper"
SECRET = "webhook-secret-0123456789"


def settings(**approvals: Any) -> Settings:
    return load_settings(environ={}, overrides={"approvals": approvals} if approvals else None)


@dataclass
class Env:
    storage: MemoryStorage
    clock: FakeClock
    approvals: Approvals
    http: httpx.AsyncClient

    async def events(self, kind: str | None = None) -> list[Any]:
        found = [e for _, e in await self.storage.list_audit(limit=1000)]
        return [e for e in found if kind is None or e.event == kind]


def owner(owner_id: str, *roles: Role, disabled: bool = False, at: Any) -> Owner:
    return Owner(owner_id, f"{owner_id}@example.com", frozenset(roles), at, at, disabled)


async def populate(storage: MemoryStorage, clock: FakeClock) -> None:
    now = clock.now()
    for o in (
        owner("alice", Role.APPROVER, at=now),  # the agent's accountable owner
        owner("bob", Role.APPROVER, at=now),
        owner("carol", Role.APPROVER, Role.REVIEWER, at=now),
        owner("dave", Role.REVIEWER, at=now),  # no approver role
        owner("erin", Role.APPROVER, disabled=True, at=now),
        owner("hank", Role.APPROVER, at=now),  # the delegate's owner
    ):
        await storage.create_owner(o)
    ceiling = frozenset({Scope("issues", Tier.ADMIN), Scope("issues", Tier.WRITE)})
    await storage.create_agent(Agent(AGENT, "alice", AgentState.ACTIVE, ceiling, now, now))
    await storage.create_agent(Agent(DELEGATE, "hank", AgentState.ACTIVE, ceiling, now, now))
    task = Task(
        id="task-1",
        agent_id=AGENT,
        owner_id="alice",
        purpose="tidy the repos",
        constraints={},
        granted=(ScopeGrant("issues", Tier.ADMIN, ("delete_repo",)),),
        denied=(),
        jkt="jkt",
        created_at=now,
        expires_at=now + timedelta(hours=1),
    )
    await storage.create_task(task, [])
    await storage.create_task(replace(task, id="task-2"), [])


@contextlib.asynccontextmanager
async def environment(clock: FakeClock, **approvals: Any) -> AsyncIterator[Env]:
    storage = MemoryStorage()
    await populate(storage, clock)
    async with httpx.AsyncClient() as http:
        service = Approvals(settings(**approvals), storage, clock, http)
        try:
            yield Env(storage, clock, service, http)
        finally:
            await service.aclose()


@pytest.fixture
async def env(clock: FakeClock) -> AsyncIterator[Env]:
    async with environment(clock) as e:
        yield e


def call(tier: Tier = Tier.ADMIN, **changes: Any) -> HeldCall:
    held = HeldCall(
        task_id="task-1",
        agent_id=AGENT,
        owner_id="alice",
        agent_owner="alice",
        intent="tidy the repos",
        tool="issues",
        action="delete_repo" if tier is Tier.ADMIN else "merge",
        tier=tier,
        target="/repos/acme/web",
        arguments={"org": "acme", "repo": "web"},
        binding={"path": {"org": "acme", "repo": "web"}, "query": "", "body": None},
        method="DELETE",
        path="/issues/repos/acme/web",
        policies=("admin-needs-approval",),
        policy_version="sha256:v1",
        jti="cred-1",
    )
    return replace(held, **changes)


async def decide(env: Env, approval: Approval, who: str, approve: bool = True, **kw: Any) -> Any:
    args: dict[str, Any] = {"reason": "checked", "cause": "admin:adm_test"}
    args.update(kw)
    return await env.approvals.decide(approval.id, as_owner=who, approve=approve, **args)


# --- holding and consuming ---------------------------------------------------------------------


async def test_hold_creates_one_pending_approval(env: Env) -> None:
    approval = await env.approvals.hold(call())
    assert approval.state is ApprovalState.PENDING
    assert approval.required == 2  # admin tier: the default quorum
    assert approval.expires_at == env.clock.now() + timedelta(seconds=900)
    assert approval.summary["method"] == "DELETE"
    assert approval.summary["arguments"] == {"org": "acme", "repo": "web"}
    assert approval.summary["policies"] == ["admin-needs-approval"]
    assert "agent_owner" not in approval.summary
    again = await env.approvals.hold(call())
    assert again.id == approval.id
    (requested,) = await env.events("approval.requested")
    assert approval.id in (requested.detail or "")
    assert (requested.task, requested.agent, requested.owner) == ("task-1", AGENT, "alice")
    assert (requested.decision, requested.code) == ("approval_required", "approval_required")
    assert requested.policies == ("admin-needs-approval",)
    assert requested.policy_version == "sha256:v1"
    assert requested.argument_digest == approval.argument_digest
    write = await env.approvals.hold(call(Tier.WRITE))
    assert write.required == 1
    assert write.id != approval.id


async def test_consume_once_and_only_this_call(env: Env) -> None:
    approval = await env.approvals.hold(call(Tier.WRITE))
    assert await env.approvals.consume(call(Tier.WRITE)) is None  # still pending
    await decide(env, approval, "bob")
    assert await env.approvals.consume(call(Tier.WRITE, task_id="task-2")) is None
    # The digest covers tool, action, target and the binding (for HTTP: path parameters,
    # query, body and its type; for MCP: the arguments).
    for other in (
        call(Tier.WRITE, binding={"path": {"org": "acme", "repo": "api"}}),
        call(Tier.WRITE, target="/repos/acme/api"),
        call(Tier.WRITE, action="close"),
        call(Tier.WRITE, tool="tracker"),
    ):
        assert await env.approvals.consume(other) is None
    consumed = await env.approvals.consume(call(Tier.WRITE))
    assert consumed is not None
    assert (consumed.id, consumed.state) == (approval.id, ApprovalState.CONSUMED)
    assert await env.approvals.consume(call(Tier.WRITE)) is None
    (event,) = await env.events("approval.consumed")
    assert event.jti == "cred-1"
    assert approval.id in (event.detail or "")


async def test_a_quorum_of_distinct_approvers(env: Env) -> None:
    approval = await env.approvals.hold(call())
    first = await decide(env, approval, "bob")
    assert (first.state, first.approvals) == (ApprovalState.PENDING, 1)
    with pytest.raises(TaskboundError) as refused:
        await decide(env, approval, "bob")
    assert refused.value.code == "already_voted"
    second = await decide(env, approval, "carol")
    assert (second.state, second.approvals) == (ApprovalState.APPROVED, 2)
    assert second.use_by == env.clock.now() + timedelta(seconds=300)
    assert [e.event for e in await env.events() if e.event != "approval.requested"] == [
        "approval.voted",
        "approval.refused",
        "approval.approved",
    ]
    votes = await env.approvals.votes(approval.id)
    assert [(v.approver, v.approve) for v in votes] == [("bob", True), ("carol", True)]


@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("alice", "self_approval_not_allowed"),
        ("dave", "approver_not_allowed"),
        ("erin", "approver_not_allowed"),
        ("nobody", "approver_not_allowed"),
        ("", "approver_not_allowed"),
    ],
)
async def test_who_may_not_decide(env: Env, who: str, code: str) -> None:
    approval = await env.approvals.hold(call(Tier.WRITE))
    for approve in (True, False):
        with pytest.raises(TaskboundError) as refused:
            await decide(env, approval, who, approve)
        assert refused.value.code == code
    assert await env.storage.get_approval(approval.id) == approval
    assert await env.approvals.votes(approval.id) == []
    refusals = await env.events("approval.refused")
    assert [e.code for e in refusals] == [code, code]
    assert all(approval.id in (e.detail or "") and e.task == "task-1" for e in refusals)


async def test_the_delegates_owner_may_not_decide_either(env: Env) -> None:
    held = call(Tier.WRITE, agent_id=DELEGATE, agent_owner="hank")
    approval = await env.approvals.hold(held)
    assert approval.summary["agent_owner"] == "hank"
    assert approval.agent_id == DELEGATE
    with pytest.raises(TaskboundError) as refused:
        await decide(env, approval, "hank")
    assert refused.value.code == "self_approval_not_allowed"
    assert (await decide(env, approval, "bob")).state is ApprovalState.APPROVED


async def test_owner_may_approve_where_configured(clock: FakeClock) -> None:
    async with environment(clock, owner_may_approve=True, admin_quorum=1) as env:
        approval = await env.approvals.hold(call())
        assert approval.required == 1
        assert (await decide(env, approval, "alice")).state is ApprovalState.APPROVED


async def test_a_deny_needs_a_reason_and_reaches_the_state(env: Env) -> None:
    approval = await env.approvals.hold(call())
    for reason in (None, "", "   "):
        with pytest.raises(TaskboundError) as refused:
            await decide(env, approval, "bob", approve=False, reason=reason)
        assert refused.value.code == "reason_required"
    assert await env.storage.get_approval(approval.id) == approval
    denied = await decide(env, approval, "bob", approve=False, reason="  not on a Friday ")
    assert (denied.state, denied.reason, denied.decided_by) == (
        ApprovalState.DENIED,
        "not on a Friday",
        "bob",
    )
    (event,) = await env.events("approval.denied")
    assert "not on a Friday" in (event.detail or "")
    assert "admin:adm_test" in (event.detail or "")
    with pytest.raises(TaskboundError) as refused:
        await decide(env, approval, "carol")
    assert refused.value.code == "approval_not_pending"


async def test_unknown_and_expired_approvals(env: Env) -> None:
    with pytest.raises(TaskboundError) as refused:
        await env.approvals.decide("apr_nope", as_owner="bob", approve=True, reason="", cause="x")
    assert refused.value.code == "not_found"
    (event,) = await env.events("approval.refused")
    assert (event.code, event.task) == ("not_found", None)
    assert "apr_nope" in (event.detail or "")
    approval = await env.approvals.hold(call())
    env.clock.advance(900)
    assert (await env.approvals.get(approval.id)).state_at(env.clock.now()) is (
        ApprovalState.EXPIRED
    )
    with pytest.raises(TaskboundError) as refused:
        await decide(env, approval, "bob")
    assert refused.value.code == "approval_expired"
    stored = await env.storage.get_approval(approval.id)
    assert stored is not None
    assert stored.state is ApprovalState.EXPIRED
    assert await env.approvals.list_approvals(ApprovalState.PENDING) == []


async def test_an_ended_tasks_call_is_not_approved(env: Env) -> None:
    approval = await env.approvals.hold(call(Tier.WRITE))
    await env.storage.end_task("task-1", TaskState.CANCELLED, "done", env.clock.now())
    with pytest.raises(TaskboundError) as refused:
        await decide(env, approval, "bob")
    assert refused.value.code == "task_not_active"
    assert (await decide(env, approval, "bob", approve=False)).state is ApprovalState.DENIED


async def test_list_is_on_the_state_as_of_now(env: Env) -> None:
    old = await env.approvals.hold(call(Tier.WRITE))
    env.clock.advance(600)
    new = await env.approvals.hold(call())
    assert [a.id for a in await env.approvals.list_approvals()] == [new.id, old.id]
    env.clock.advance(300)
    assert [a.id for a in await env.approvals.list_approvals(ApprovalState.PENDING)] == [new.id]
    expired = await env.approvals.list_approvals(ApprovalState.EXPIRED)
    assert [a.id for a in expired] == [old.id]
    env.clock.advance(600)
    assert await env.approvals.sweep() == 1
    assert {a.state for a in await env.approvals.list_approvals()} == {ApprovalState.EXPIRED}


# --- long polls ------------------------------------------------------------------------------


async def test_wait_wakes_at_once_on_a_decision(env: Env) -> None:
    approval = await env.approvals.hold(call(Tier.WRITE))
    started = time.monotonic()
    waiting = asyncio.create_task(env.approvals.wait(approval.id, 20))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await decide(env, approval, "bob", approve=False, reason="no")
    decided = await asyncio.wait_for(waiting, 1)
    assert decided.state is ApprovalState.DENIED
    assert time.monotonic() - started < 1


async def test_wait_sees_other_processes_and_expiry(env: Env) -> None:
    approval = await env.approvals.hold(call(Tier.WRITE))
    started = time.monotonic()
    assert (await env.approvals.wait(approval.id, 0.3)).state is ApprovalState.PENDING
    assert 0.3 <= time.monotonic() - started < 2
    # A vote straight in the store (as another replica would make it) is seen by polling.
    waiting = asyncio.create_task(env.approvals.wait(approval.id, 20))
    await asyncio.sleep(0.05)
    await env.storage.vote_approval(
        approval.id, "bob", True, None, env.clock.now(), timedelta(minutes=5)
    )
    assert (await asyncio.wait_for(waiting, 2)).state is ApprovalState.APPROVED
    held = await env.approvals.hold(call())
    waiting = asyncio.create_task(env.approvals.wait(held.id, 20))
    await asyncio.sleep(0.05)
    env.clock.advance(900)
    expired = await asyncio.wait_for(waiting, 2)
    assert expired.state_at(env.clock.now()) is ApprovalState.EXPIRED
    with pytest.raises(TaskboundError) as unknown:
        await env.approvals.wait("apr_nope", 1)
    assert unknown.value.code == "not_found"


# --- the webhook -------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every delivery, answers from a script."""

    url: str
    script: list[int] = field(default_factory=list)
    delay: float = 0.0
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.seen.append((dict(request.headers), body))
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.script.pop(0) if self.script else 200
        if status == 200:
            self.arrived.set()
        return Response(status_code=status)


@contextlib.asynccontextmanager
async def receiver(**kw: Any) -> AsyncIterator[Receiver]:
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}/hooks/approvals", **kw)
    app = Starlette(routes=[Route("/hooks/approvals", rec.handle, methods=["POST"])])
    server, task = await serve(app, port)
    try:
        yield rec
    finally:
        server.should_exit = True
        await task


def check_delivery(headers: dict[str, str], body: bytes, clock: FakeClock) -> dict[str, Any]:
    assert headers["content-type"] == "application/json"
    signature = headers[SIGNATURE_HEADER.lower()]
    assert verify_webhook(SECRET.encode(), signature, body, now=to_epoch(clock.now()))
    assert not verify_webhook(b"not-the-secret-at-all", signature, body, now=to_epoch(clock.now()))
    message: dict[str, Any] = json.loads(body)
    assert set(message) == {"text", "blocks"}
    return message


async def test_a_new_approval_is_announced_signed_and_retried(clock: FakeClock) -> None:
    async with (
        receiver(script=[500, 503]) as rec,
        environment(clock, webhook_url=rec.url, webhook_secret=SECRET) as env,
    ):
        assert env.approvals.webhook is not None
        env.approvals.webhook._backoff = 0.05  # the production default is 0.5 s
        approval = await env.approvals.hold(call())
        await env.approvals.hold(call())  # the same approval: announced once
        await asyncio.wait_for(rec.arrived.wait(), 5)
        await env.approvals.webhook.drain()
        assert len(rec.seen) == 3  # 500, 503, then 200
        for headers, body in rec.seen:
            message = check_delivery(headers, body, clock)
        assert approval.id in message["text"]
        assert AGENT in message["text"]
        text = json.dumps(message["blocks"])
        assert "issues.delete_repo (admin)" in text
        assert "2 approvers needed" in text
        assert "tidy the repos" in text
        assert '\\"repo\\": \\"web\\"' in text  # the arguments, as a code block
        assert (env.approvals.webhook.delivered, env.approvals.webhook.failed) == (1, 0)


async def test_the_webhook_gives_up_and_never_holds_up_the_caller(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with receiver(script=[500] * 10, delay=0.3) as rec, httpx.AsyncClient() as http:
        hook = ApprovalWebhook(
            rec.url,
            SECRET.encode(),
            http,
            clock,
            retries=2,
            timeout=5,
            public_url="https://tb.example",
            backoff=0.01,
        )
        async with environment(clock) as env:
            approval = await env.approvals.hold(call())
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="taskbound.approvals"):
            hook.notify(approval)
            assert time.monotonic() - started < 0.1  # delivery runs in the background
            await hook.drain()
        assert len(rec.seen) == 3  # one attempt and two retries
        assert (hook.delivered, hook.failed) == (0, 1)
        assert any("delivery failed" in r.message for r in caplog.records)


async def test_the_webhook_does_not_retry_a_refusal(clock: FakeClock) -> None:
    async with receiver(script=[400]) as rec, httpx.AsyncClient() as http:
        hook = ApprovalWebhook(
            rec.url, SECRET.encode(), http, clock, retries=3, timeout=5, public_url="x"
        )
        async with environment(clock) as env:
            hook.notify(await env.approvals.hold(call()))
        await hook.drain()
        assert len(rec.seen) == 1
        assert hook.failed == 1


async def test_an_unreachable_webhook_is_logged_not_fatal(clock: FakeClock) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    async with environment(clock, webhook_url=url, webhook_secret=SECRET, webhook_retries=1) as env:
        assert env.approvals.webhook is not None
        env.approvals.webhook._backoff = 0.01
        approval = await env.approvals.hold(call())
        await env.approvals.webhook.drain()
        assert env.approvals.webhook.failed == 1
        assert (await env.approvals.get(approval.id)).state is ApprovalState.PENDING


def test_slack_message_escapes_what_the_agent_wrote(clock: FakeClock) -> None:
    approval = Approval(
        id="apr_1",
        task_id="task-1",
        agent_id=AGENT,
        owner_id="alice",
        tool="issues",
        action="merge",
        tier=Tier.WRITE,
        target="/x",
        argument_digest="sha256:a",
        action_digest="sha256:b",
        intent="<!channel> & friends",
        summary={"method": "PUT", "path": "/x", "arguments": {"t": "<@U123>"}, "policies": []},
        required=1,
        created_at=clock.now(),
        expires_at=clock.now() + timedelta(minutes=15),
    )
    text = json.dumps(slack_message(approval, "https://tb.example")["blocks"])
    assert "<!channel>" not in text
    assert "&lt;!channel&gt; &amp; friends" in text
    assert "<@U123>" not in text


@pytest.mark.parametrize(
    "approvals",
    [
        {"webhook_url": "https://hooks.example/x"},  # no secret
        {"webhook_url": "https://hooks.example/x", "webhook_secret": "short"},
        {"webhook_url": "http://hooks.example/x", "webhook_secret": SECRET},  # clear text
        {"webhook_url": "ftp://hooks.example/x", "webhook_secret": SECRET},
        {"admin_quorum": 0},
        {"unknown": 1},
    ],
)
def test_bad_approvals_configuration(approvals: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        settings(**approvals)


def test_the_webhook_secret_is_masked() -> None:
    shown = settings(webhook_url="https://hooks.example/x", webhook_secret=SECRET).redacted()
    assert SECRET not in json.dumps(shown)
    assert shown["approvals"]["webhook_url"] == "https://hooks.example/x"
