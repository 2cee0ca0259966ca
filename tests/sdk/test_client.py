"""The async client against a live server: start, call, refuse, refresh, end.

Every test talks to a real broker and gateway on loopback; credentials that should be dead
are checked with a raw HTTP call carrying the credential and a proof by the task's key,
with no SDK in the way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskbound.sdk import (
    Client,
    NotGranted,
    Refused,
    ServiceUnavailable,
    TaskboundClientError,
    TaskEnded,
    Unauthorized,
)
from taskbound.sdk.errors import ApprovalRequired, error_from
from tests.gateway.conftest import World
from tests.sdk.conftest import (
    INTENT,
    LIST,
    calls_of,
    credentials_of,
    eventually,
    identity,
    open_sdk_world,
    raw_call,
    task_state,
)

READ = [("issues", "read")]


class Boom(Exception):
    """The agent's own failure."""


async def test_a_task_calls_an_http_tool_and_ends_on_exit(world: World, client: Client) -> None:
    async with client.task(
        "triage the flaky-test issues",
        on_behalf_of="alice",
        scopes=[("issues", "read")],
        constraints=INTENT,
    ) as task:
        async with task.http("issues") as issues:
            r = await issues.get("/repos/acme/web/issues")
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "path": "/api/repos/acme/web/issues"}
    assert task.ended
    assert (await task.state())["state"] == "completed"


# --- calls and refusals ------------------------------------------------------------------


async def test_the_tier_is_chosen_or_the_call_is_refused_locally(
    world: World, client: Client
) -> None:
    scopes = [("issues", "read"), ("issues", "write")]
    async with client.task("triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT) as t:
        with pytest.raises(NotGranted, match="issues is held at tiers read, write"):
            t.http("issues")  # ambiguous: say which
        with pytest.raises(NotGranted, match="no credential for tool 'tracker'"):
            t.http("tracker")
        with pytest.raises(NotGranted, match="no issues:admin credential"):
            t.http("issues", "admin")
        with pytest.raises(NotGranted):
            await t.credential("issues")
        assert (await t.state())["state"] == "active"
        async with t.http("issues", "write") as issues:
            r = await issues.post(LIST, json={"title": "flaky"})
        assert r.status_code == 200, r.text
    assert [s["method"] for s in world.echo.seen] == ["POST"]
    assert world.echo.seen[0]["body"] == '{"title":"flaky"}'
    # The credential never reaches the tool; the gateway's own secret does.
    assert "dpop" not in world.echo.seen[0]["headers"]
    assert "DPoP " not in world.echo.seen[0]["headers"].get("authorization", "")


async def test_the_tools_own_errors_pass_through_untouched(world: World, client: Client) -> None:
    async with (
        client.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        for status in (400, 401, 403, 404, 409, 500, 503):
            r = await issues.get(LIST, params={"status": status})
            assert r.status_code == status
            assert r.headers["x-upstream"] == "echo"
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"] == "https://tool.example/oops"
    assert len(world.echo.seen) == 7


async def test_gateway_refusals_raise_typed_errors(world: World, client: Client) -> None:
    async with (
        client.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        with pytest.raises(Refused) as refused:  # a write with a read credential
            await issues.post(LIST, json={"title": "x"})
        err = refused.value
        assert type(err) is Refused
        assert (err.code, err.status) == ("insufficient_scope", 403)
        assert err.body["type"] == "https://taskbound.dev/problems/insufficient_scope"
        with pytest.raises(Refused) as refused:  # outside the task's intent
            await issues.get("/repos/acme/payroll/issues")
        assert (refused.value.code, refused.value.status) == ("policy_denied", 403)
        with pytest.raises(Refused) as refused:  # no such action of the tool
            await issues.get("/admin/secrets")
        assert refused.value.status in (403, 404)
        assert world.echo.seen == []

        jti = task.credentials()[0].jti
        r = await world.live.http.post(
            f"/v1/admin/credentials/{jti}/revoke", json={}, headers=world.live.admin
        )
        assert r.status_code == 200, r.text
        with pytest.raises(Unauthorized) as refused:
            await issues.get(LIST)
        assert (refused.value.code, refused.value.status) == ("invalid_token", 401)
    assert world.echo.seen == []


async def test_the_credential_goes_to_its_tool_only(world: World, client: Client) -> None:
    async with (
        client.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        for url in (
            f"{world.echo.base}/api{LIST}",  # the tool itself, past the gateway
            f"{world.live.base}/tracker",  # another tool
            f"{world.live.base}/issues-archive{LIST}",
            f"{world.live.base}/v1/admin/tasks",
            f"https://{world.live.base.split('://')[1]}/issues{LIST}",  # another scheme
        ):
            with pytest.raises(TaskboundClientError) as refused:
                await issues.get(url)
            assert refused.value.code == "wrong_destination", url
        assert (await issues.get(f"{world.live.base}/issues{LIST}")).status_code == 200
    assert len(world.echo.seen) == 1


async def test_a_tool_imitating_a_gateway_refusal_is_passed_through(
    world: World, client: Client
) -> None:
    async with (
        client.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        r = await issues.get(LIST, params={"status": 403, "forge": "approval_required"})
        assert r.status_code == 403
        assert r.json()["title"] == "the tool's own"
        # The gateway strips the imitated mark; only its own refusals carry it.
        assert "taskbound-refusal" not in r.headers
        with pytest.raises(Refused) as refused:
            await issues.post(LIST, json={})  # a write with the read credential
        assert refused.value.code == "insufficient_scope"


async def test_mcp_refusals_raise_typed_errors(world: World, client: Client) -> None:
    scopes = [("tracker", "read")]
    async with (
        client.task("triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT) as task,
        task.mcp("tracker") as session,
    ):
        with pytest.raises(Refused) as refused:  # another tier's tool
            await session.call_tool("create_issue", {"project": "WEB", "title": "x"})
        assert refused.value.code == "insufficient_scope"
        with pytest.raises(Refused) as refused:  # outside the task's intent
            await session.call_tool("search", {"project": "PAYROLL"})
        assert refused.value.code == "policy_denied"
        assert world.mcp_calls == []
        # Refusals of the HTTP request itself (here: the task revoked meanwhile) too.
        r = await world.live.http.post(
            f"/v1/admin/tasks/{task.id}/revoke", json={}, headers=world.live.admin
        )
        assert r.status_code == 200, r.text
        for _ in range(2):
            with pytest.raises(Unauthorized) as refused:
                await session.call_tool("search", {"project": "WEB"})
            assert (refused.value.code, refused.value.status) == ("invalid_token", 401)
        with pytest.raises(Unauthorized):
            await session.list_tools()
    assert world.mcp_calls == []


# --- the end of a task -------------------------------------------------------------------


async def test_leaving_by_an_exception_cancels_the_task(world: World, client: Client) -> None:
    boom = Boom("the agent failed")
    inside: dict[str, Any] = {}

    async def agent() -> None:
        async with client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as t:
            inside.update(task=t, token=await t.credential("issues"), issues=t.http("issues"))
            assert (await inside["issues"].get(LIST)).status_code == 200
            raise boom

    with pytest.raises(Boom) as raised:
        await agent()
    assert raised.value is boom  # unchanged, not wrapped
    assert raised.value.__context__ is None
    t, token, issues = inside["task"], inside["token"], inside["issues"]
    assert t.ended
    assert await task_state(world, t.id) == "cancelled"
    assert "Boom" in (await t.state())["end_reason"]

    r = await raw_call(world, "GET", f"/issues{LIST}", token, t._key.proof)
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_token"
    with pytest.raises(Unauthorized):  # the client made inside the block, reused
        await issues.get(LIST)
    await issues.aclose()
    with pytest.raises(TaskEnded):  # nor can a new credential be had
        await t.refresh("issues", "read")
    assert len(world.echo.seen) == 1


async def test_cancelling_the_surrounding_task_cancels_the_task(
    world: World, client: Client
) -> None:
    inside: asyncio.Queue[Any] = asyncio.Queue()

    async def agent() -> None:
        async with client.task(
            "triage", on_behalf_of="alice", scopes=READ, constraints=INTENT
        ) as t:
            await inside.put((t, await t.credential("issues")))
            await asyncio.Event().wait()  # work that never finishes by itself

    running = asyncio.create_task(agent())
    t, token = await asyncio.wait_for(inside.get(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    # The end call reached the server before the cancellation finished.
    assert await task_state(world, t.id) == "cancelled"
    assert "CancelledError" in (await t.state())["end_reason"]
    r = await raw_call(world, "GET", f"/issues{LIST}", token, t._key.proof)
    assert (r.status_code, r.json()["code"]) == (401, "invalid_token")


def slow_endings(seconds: float, started: asyncio.Event) -> httpx.AsyncClient:
    """The agent's own HTTP client, whose task-ending calls take ``seconds`` to leave."""

    async def hold(request: httpx.Request) -> None:
        if request.url.path.endswith(("/complete", "/cancel")):
            started.set()
            await asyncio.sleep(seconds)

    return httpx.AsyncClient(timeout=10, event_hooks={"request": [hold]})


async def test_a_second_cancellation_while_ending_still_ends_the_task(world: World) -> None:
    ending = asyncio.Event()
    inside = asyncio.Event()
    async with (
        slow_endings(0.3, ending) as http,
        Client(world.live.base, identity=identity(world), http=http) as client,
    ):

        async def agent() -> str:
            async with client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as t:
                ids.append(t.id)
                inside.set()
                await asyncio.Event().wait()
            return "never"

        ids: list[str] = []
        running = asyncio.create_task(agent())
        await asyncio.wait_for(inside.wait(), 5)
        running.cancel()
        await asyncio.wait_for(ending.wait(), 5)
        running.cancel()  # again, while the end call is on its way
        with pytest.raises(asyncio.CancelledError):
            await running

        async def cancelled() -> bool:
            return await task_state(world, ids[0]) == "cancelled"

        await eventually(cancelled)


async def test_a_cancellation_while_completing_is_not_swallowed(world: World) -> None:
    ending = asyncio.Event()
    async with (
        slow_endings(0.3, ending) as http,
        Client(world.live.base, identity=identity(world), http=http) as client,
    ):
        ids: list[str] = []

        async def agent() -> str:
            async with client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as t:
                ids.append(t.id)
            return "finished"

        running = asyncio.create_task(agent())
        await asyncio.wait_for(ending.wait(), 5)
        running.cancel()  # the block is done; the task is being completed
        with pytest.raises(asyncio.CancelledError):
            await running

        async def completed() -> bool:
            return await task_state(world, ids[0]) == "completed"

        await eventually(completed)


async def test_a_normal_exit_completes_and_an_early_end_is_kept(
    world: World, client: Client
) -> None:
    async with client.task("one", on_behalf_of="alice", scopes=READ, constraints=INTENT) as one:
        assert (await one.state())["state"] == "active"
    assert await task_state(world, one.id) == "completed"

    async with client.task("two", on_behalf_of="alice", scopes=READ, constraints=INTENT) as two:
        await two.cancel("changed my mind")
        assert two.ended
    assert await task_state(world, two.id) == "cancelled"
    assert (await two.state())["end_reason"] == "changed my mind"

    ids: list[str] = []

    async def agent() -> None:
        async with client.task("three", on_behalf_of="alice", scopes=READ, constraints=INTENT) as t:
            ids.append(t.id)
            await t.complete("done early")
            raise Boom

    with pytest.raises(Boom):
        await agent()
    assert await task_state(world, ids[0]) == "completed"  # not turned into cancelled


async def test_an_exception_after_an_admin_revoked_the_task_propagates(
    world: World, client: Client
) -> None:
    ids: list[str] = []

    async def agent() -> None:
        async with client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as t:
            ids.append(t.id)
            r = await world.live.http.post(
                f"/v1/admin/tasks/{t.id}/revoke", json={}, headers=world.live.admin
            )
            assert r.status_code == 200, r.text
            async with t.http("issues") as issues:
                with pytest.raises(Unauthorized):
                    await issues.get(LIST)
            raise Boom

    with pytest.raises(Boom):
        await agent()
    assert await task_state(world, ids[0]) == "revoked"


# --- refresh -----------------------------------------------------------------------------


async def test_a_credential_close_to_expiry_is_replaced_before_use(
    world: World, client: Client
) -> None:
    async with (
        client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
        task.http("issues") as issues,
    ):
        first = task.credentials()[0]
        assert (await issues.get(LIST)).status_code == 200
        first.expires_at = time.time() + 5  # as if minutes had passed
        assert (await issues.get(LIST)).status_code == 200
        second = task.credentials()[0]
        assert second.jti not in ("", first.jti)
        assert second.expires_at > time.time() + 60
        used = [c["jti"] for c in await calls_of(world, task.id)]
        assert used == [first.jti, second.jti]

        # Many requests at once with a stale credential: one refresh, shared by all.
        second.expires_at = time.time() + 5
        answers = await asyncio.gather(*(issues.get(LIST) for _ in range(20)))
        assert all(r.status_code == 200 for r in answers)
        issued = await credentials_of(world, task.id)
        assert len(issued) == 3
        third = task.credentials()[0]
        assert third.jti not in (first.jti, second.jti)
        used = [c["jti"] for c in await calls_of(world, task.id)]
        assert used[2:] == [third.jti] * 20


async def test_a_short_lived_credential_is_not_refreshed_on_every_call(tmp_path: Path) -> None:
    async for world in open_sdk_world(tmp_path, credentials={"max_ttl_seconds": 10}):
        async with (
            Client(world.live.base, identity=identity(world)) as client,
            client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task,
            task.http("issues") as issues,
        ):
            cred = task.credentials()[0]
            assert cred.expires_at - time.time() <= 10
            for _ in range(3):
                assert (await issues.get(LIST)).status_code == 200
            assert len(await credentials_of(world, task.id)) == 1
            assert {c["jti"] for c in await calls_of(world, task.id)} == {cred.jti}


async def test_no_refresh_once_the_task_has_ended(world: World, client: Client) -> None:
    async with client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task:
        r = await world.live.http.post(
            f"/v1/admin/tasks/{task.id}/revoke", json={}, headers=world.live.admin
        )
        assert r.status_code == 200, r.text
        task.credentials()[0].expires_at = time.time() + 1
        async with task.http("issues") as issues:
            with pytest.raises(TaskEnded):
                await issues.get(LIST)
    assert world.echo.seen == []


# --- secrets stay in memory ---------------------------------------------------------------


async def test_no_token_or_key_in_reprs_and_nothing_on_disk(
    world: World, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    async with client.task("t", on_behalf_of="alice", scopes=READ, constraints=INTENT) as task:
        token = await task.credential("issues")
        delegation = await task.delegate("issues")
        async with task.http("issues") as issues:
            assert (await issues.get(LIST)).status_code == 200
        private = task._key._key.key.as_dict(private=True)["d"]  # the private scalar
        secrets = [token, token.split(".")[2], private]
        shown = " ".join(
            [
                repr(task),
                str(task.info),
                repr(task._key),
                repr(task.credentials()),
                repr(delegation),
                repr(vars(task)),
                repr(vars(task._key)),
            ]
        )
        for secret in secrets:
            assert secret not in shown
    assert list(cwd.iterdir()) == []
    assert list(home.iterdir()) == []


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (403, {"code": "approval_required", "approval_id": "apr_1"}, ApprovalRequired, None),
        (409, {"code": "task_not_active", "detail": "ended"}, TaskEnded, None),
        (401, {"code": "invalid_token"}, Unauthorized, None),
        (400, {"error": "invalid_dpop_proof"}, Unauthorized, None),
        (401, {"code": "use_dpop_nonce"}, Unauthorized, None),
        (401, {"error": "invalid_client"}, Unauthorized, None),
        (403, {"code": "something_new"}, Refused, None),
        (503, {"code": "revocation_feed_stale"}, ServiceUnavailable, None),
        (502, "<html>bad gateway</html>", ServiceUnavailable, "invalid_response"),
        (400, None, Refused, "invalid_response"),
        (400, {"code": 7}, Refused, "invalid_response"),
        (400, ["not", "an", "object"], Refused, "invalid_response"),
    ],
)
def test_error_mapping(status: int, body: Any, cls: type[TaskboundClientError], code: Any) -> None:
    err = error_from(status, body)
    assert type(err) is cls
    assert err.status == status
    expected = code or (body.get("code") or body.get("error"))
    assert err.code == expected
