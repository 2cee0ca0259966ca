"""Delegation through the SDK (RFC 8693 token exchange, docs/delegation.md): the parent
hands over a JSON document with its credential and its consent, never its key; the
sub-agent, with its own identity and its own key, exchanges it for a narrower credential
of its own, which works for what was delegated, is refused for anything else, and dies
with the parent's task."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskbound.sdk import (
    Client,
    Delegation,
    NotGranted,
    Refused,
    TaskboundClientError,
    Unauthorized,
)
from tests.gateway.conftest import World
from tests.sdk.conftest import (
    HELPER,
    INTENT,
    LIST,
    OTHER,
    REPO,
    STRANGER,
    identity,
    raw_call,
)

WEB_AND_API = {**INTENT, "repo": ["web", "api"]}
API_LIST = "/repos/acme/api/issues"
FIELDS = {
    "token_endpoint",
    "gateway_url",
    "tool",
    "tier",
    "subject_token",
    "subject_dpop",
    "actions",
    "constraints",
}


def part(jwt: str, index: int) -> dict[str, Any]:
    """A JWT's header (0) or claims (1), unverified: the test only reads them."""
    raw = jwt.split(".")[index]
    return dict(json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))))


@pytest.fixture
async def helper(world: World) -> AsyncIterator[Client]:
    """The sub-agent's own client, with its own identity."""
    async with Client(world.live.base, identity=identity(world, HELPER)) as c:
        yield c


async def test_a_sub_agent_gets_a_narrower_credential_of_its_own(
    world: World, client: Client, helper: Client
) -> None:
    scopes = [("issues", "read"), ("issues", "write")]
    async with client.task(
        "triage", on_behalf_of="alice", scopes=scopes, constraints=WEB_AND_API, may_act=HELPER
    ) as task:
        handoff = (await task.delegate("issues", "read", constraints={"repo": "web"})).to_json()

        # What crosses over: only the documented fields, no key.
        doc = json.loads(handoff)
        assert set(doc) == FIELDS
        assert (doc["tool"], doc["tier"], doc["actions"]) == ("issues", "read", None)
        assert doc["constraints"] == {"repo": "web"}
        private = task._key._key.key.as_dict(private=True)["d"]
        assert private not in handoff
        assert '"d"' not in json.dumps(part(doc["subject_dpop"], 0))
        assert set(part(doc["subject_dpop"], 0)["jwk"]) == {"kty", "crv", "x"}

        delegated = await helper.accept(handoff)
        assert delegated.jkt != task.jkt
        token = await delegated.credential("issues")
        claims = part(token, 1)
        assert claims["cnf"]["jkt"] == delegated.jkt
        assert claims["act"] == {"sub": HELPER}
        assert claims["tsk"] == task.id
        assert delegated.details["constraints"]["repo"] == "web"
        assert token not in repr(delegated)
        assert delegated.jkt in repr(delegated)

        async with delegated.http("issues") as issues:
            r = await issues.get(LIST)
            assert r.status_code == 200, r.text
            with pytest.raises(Refused) as refused:  # another tier's action
                await issues.post(LIST, json={"title": "x"})
            assert refused.value.code == "insufficient_scope"
            with pytest.raises(Refused) as refused:
                await issues.delete(REPO)
            assert refused.value.code == "insufficient_scope"
            with pytest.raises(Refused) as refused:  # the parent may, the delegate not
                await issues.get(API_LIST)
            assert refused.value.code == "policy_denied"
        async with task.http("issues", "read") as mine:
            assert (await mine.get(API_LIST)).status_code == 200
        # The parent's credential with the delegate's key is worthless, and vice versa.
        parent_token = await task.credential("issues", "read")
        r = await raw_call(world, "GET", f"/issues{LIST}", parent_token, delegated._key.proof)
        assert r.status_code == 401, r.text
        r = await raw_call(world, "GET", f"/issues{LIST}", token, task._key.proof)
        assert r.status_code == 401, r.text
        kept = delegated.http("issues")

    # The task is over: the delegated credential is dead at the gateway.
    with pytest.raises(Unauthorized):
        await kept.get(LIST)
    await kept.aclose()
    r = await raw_call(world, "GET", f"/issues{LIST}", token, delegated._key.proof)
    assert (r.status_code, r.json()["code"]) == (401, "invalid_token")
    assert [s["path"] for s in world.echo.seen] == ["/api/repos/acme/web/issues", "/api" + API_LIST]


async def test_named_actions_only(world: World, client: Client, helper: Client) -> None:
    scopes = [("tracker", "read")]
    async with client.task(
        "triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT
    ) as task:
        delegation = await task.delegate("tracker", actions=["search"])
        delegated = await helper.accept(delegation)
        assert delegated.details["actions"] == ["search"]
        async with delegated.mcp("tracker") as session:
            assert [t.name for t in (await session.list_tools()).tools] == ["search"]
            found = await session.call_tool("search", {"project": "WEB"})
            assert "3 issues in WEB" in found.content[0].text
    assert world.mcp_calls == [{"tool": "search", "project": "WEB", "query": ""}]


async def test_no_actions_is_refused_not_widened(
    world: World, client: Client, helper: Client
) -> None:
    scopes = [("issues", "read")]
    async with client.task(
        "triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT
    ) as task:
        delegation = await task.delegate("issues", actions=[])
        with pytest.raises(Refused) as refused:
            await helper.accept(delegation)
        assert refused.value.code == "invalid_scope"
        with pytest.raises(Refused) as refused:  # nor more than the parent has
            await helper.accept(await task.delegate("issues", actions=["delete_repo"]))
        assert refused.value.code == "invalid_scope"
        with pytest.raises(Refused) as refused:
            await helper.accept(await task.delegate("issues", constraints={"repo": "cli"}))
        assert refused.value.code == "invalid_scope"


async def test_a_handoff_naming_another_token_endpoint_is_refused(
    world: World, client: Client, helper: Client
) -> None:
    scopes = [("issues", "read")]
    async with client.task(
        "triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT
    ) as task:
        doc = json.loads((await task.delegate("issues")).to_json())
        doc["token_endpoint"] = f"{world.echo.base}/collect"  # where identities would leak
        with pytest.raises(TaskboundClientError) as refused:
            await helper.accept(json.dumps(doc))
        assert refused.value.code == "delegation_elsewhere"
    assert world.echo.seen == []  # the helper's identity token went nowhere


async def test_the_consent_is_accepted_once(world: World, client: Client, helper: Client) -> None:
    async with client.task(
        "triage", on_behalf_of="alice", scopes=[("issues", "read")], constraints=INTENT
    ) as task:
        handoff = (await task.delegate("issues")).to_json()
        await helper.accept(handoff)
        with pytest.raises(Refused) as refused:  # a copy of the handoff, replayed
            await helper.accept(handoff)
        assert refused.value.status == 400


async def test_who_may_accept(world: World, client: Client) -> None:
    async with (
        Client(world.live.base, identity=identity(world, OTHER)) as other,
        Client(world.live.base, identity=identity(world, STRANGER)) as stranger,
    ):
        scopes = [("issues", "read")]
        async with client.task(
            "triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT, may_act=HELPER
        ) as task:
            with pytest.raises(Refused) as refused:  # may_act names someone else
                await other.accept(await task.delegate("issues"))
            assert refused.value.code == "invalid_grant"
        async with client.task(
            "triage", on_behalf_of="alice", scopes=scopes, constraints=INTENT
        ) as task:
            with pytest.raises(Refused) as refused:  # authority never crosses owners
                await stranger.accept(await task.delegate("issues"))
            assert refused.value.code == "invalid_scope"
            with pytest.raises(Refused) as refused:  # the task's own agent is in the chain
                await client.accept(await task.delegate("issues"))
            assert refused.value.code == "invalid_grant"
            # A sub-agent delegates on (depth 2).
            sub = await other.accept(await task.delegate("issues"))
            async with Client(world.live.base, identity=identity(world, HELPER)) as helper:
                subsub = await helper.accept(await sub.delegate("issues"))
            assert part(await subsub.credential("issues"), 1)["act"] == {
                "sub": HELPER,
                "act": {"sub": OTHER},
            }
            async with subsub.http("issues") as issues:
                assert (await issues.get(LIST)).status_code == 200
            with pytest.raises(NotGranted):
                await sub.delegate("tracker")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[]", "a delegation is a JSON object"),
        ("{}", "needs 'token_endpoint'"),
        ('{"tool": "issues"}', "needs 'token_endpoint'"),
        ("not json", "Expecting value"),
    ],
)
def test_a_malformed_handoff_is_a_value_error(doc: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Delegation.from_json(doc)


def test_a_handoff_with_wrongly_typed_fields_is_a_value_error() -> None:
    good = {
        "token_endpoint": "https://tb.example/oauth/token",
        "gateway_url": "https://tb.example",
        "tool": "issues",
        "tier": "read",
        "subject_token": "a.b.c",
        "subject_dpop": "d.e.f",
        "actions": ["list_issues"],
        "constraints": {"repo": "web"},
    }
    assert Delegation.from_json(json.dumps(good)).actions == ("list_issues",)
    for key, bad in (
        ("actions", "list_issues"),  # a string, not a list of names
        ("actions", [1]),
        ("constraints", ["repo"]),
        ("tool", None),
        ("subject_token", 7),
    ):
        with pytest.raises(ValueError, match=key):
            Delegation.from_json(json.dumps({**good, key: bad}))
