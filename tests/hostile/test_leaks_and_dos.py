"""What an attacker can learn (secrets, keys, internals) and what it can make the server
spend."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from taskbound.core.clock import to_epoch
from taskbound.core.jws import sign_compact
from taskbound.core.model import KeyPurpose
from taskbound.logs import ConsoleFormatter, JsonFormatter
from taskbound.storage.replay import MemoryReplayCache
from tests.api.conftest import AGENT, REGISTRY, Agent, Live

from .helpers import READ, b64json

SECRET = "upstream-secret-never-returned"
BODY: dict[str, Any] = {
    "intent": {"purpose": "p"},
    "on_behalf_of": "alice",
    "scopes": [READ],
    "ttl_seconds": 300,
}


async def test_upstream_secret_and_private_keys_never_leave(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    tool = dict(REGISTRY["tools"][0])
    tool["upstream_secret"] = SECRET + "-2"
    for method, path, kw in (
        ("GET", "/v1/admin/tools", {}),
        ("GET", "/v1/admin/tools/issues", {}),
        ("PUT", "/v1/admin/tools/issues", {"json": tool}),
        ("POST", "/v1/admin/apply", {"json": {"tools": [tool]}}),
        ("POST", "/v1/admin/apply?dry_run=1", {"json": {"tools": [tool]}}),
        ("POST", "/v1/admin/tools", {"json": {**tool, "id": "issues"}}),  # conflict path
        ("POST", "/v1/admin/tools", {"json": {**tool, "id": "x", "audience": "nope"}}),
        ("POST", "/v1/admin/tools", {"json": {**tool, "id": "y", "upstream_secret": 5}}),
        ("GET", "/v1/admin/keys", {}),
        ("POST", "/v1/admin/keys/rotate", {}),
        ("GET", "/.well-known/jwks.json", {}),
        ("GET", "/.well-known/oauth-authorization-server", {}),
        ("GET", "/metrics", {}),
    ):
        r = await live.http.request(method, path, headers=live.admin, **kw)
        assert r.status_code < 500, (method, path, r.text)
        bodies.append(r.text)
    agent = await live.agent()
    task = (await agent.call("POST", "/v1/tasks", json=BODY)).json()
    bodies.append(str(task))
    token = task["credentials"][0]["access_token"]
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    bodies.append(r.text)
    everything = "\n".join(bodies)
    logs = "\n".join(JsonFormatter().format(rec) for rec in caplog.records)
    assert SECRET not in everything
    assert SECRET not in logs
    for key in await live.services.keys.list():
        priv = live.services.keys.signer(key.purpose).key.as_dict(private=True)["d"]
        assert priv not in everything
        assert priv not in logs
    jwks = (await live.http.get("/.well-known/jwks.json")).json()
    for k in jwks["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(k)
    dev_kid = live.services.keys.signer(KeyPurpose.DEV_IDENTITY).kid
    assert dev_kid not in {k["kid"] for k in jwks["keys"]}


async def check_tokens_never_reach_the_logs(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    agent = await live.agent()
    proof = agent.proof("POST", "/v1/tasks")
    task = (await agent.call("POST", "/v1/tasks", proof=proof, json=BODY)).json()
    token = task["credentials"][0]["access_token"]
    await agent.call("POST", "/v1/tasks", proof=proof, json=BODY)  # replay: refused, logged
    await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    await live.http.post("/oauth/revoke", data={"token": token})
    await live.http.get("/v1/admin/owners", headers={"Authorization": "Bearer tbat_guess"})
    logs = "\n".join(JsonFormatter().format(rec) for rec in caplog.records)
    for secret in (
        agent.identity,
        agent.identity.split(".")[2],
        proof.split(".")[2],
        token,
        token.split(".")[2],
        live.admin_token,
        "tbat_guess",
    ):
        assert secret not in logs


async def check_errors_do_not_reveal_why_a_token_failed(live: Live) -> None:
    agent = await live.agent()
    key = live.services.keys.signer(KeyPurpose.DEV_IDENTITY)
    now = to_epoch(live.clock.now())
    claims = {"sub": AGENT, "aud": ["https://elsewhere"], "exp": now + 60}
    wrong_aud = sign_compact({"alg": key.alg, "kid": key.kid}, claims, key)
    details = set()
    for tok in (wrong_aud, "a.b.c", agent.identity[:-4] + "AAAA"):
        r = await Agent(live, tok).call("POST", "/v1/tasks", json=BODY)
        assert r.status_code == 401
        details.add(r.json()["detail"])
    assert len(details) == 1, details  # one opaque answer, whatever the reason


async def test_refusal_logs_cannot_be_forged(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    forged = "ES256\nwarning taskbound.http: request accepted  code=ok"
    tok = f"{b64json({'alg': forged, 'kid': 'k'})}.{b64json({'sub': AGENT})}.c2ln"
    r = await Agent(live, tok).call("POST", "/v1/tasks", json=BODY)
    assert r.status_code == 401
    lines = [ConsoleFormatter().format(rec) for rec in caplog.records]
    assert all("\n" not in line for line in lines), lines


async def test_garbage_revocations_do_not_reload_keys(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = live.services.keys.reload

    async def counting() -> None:
        nonlocal calls
        calls += 1
        await real()

    monkeypatch.setattr(live.services.keys, "reload", counting)
    for tok in ("garbage", "a.b.c", "x" * 100):
        assert (await live.http.post("/oauth/revoke", data={"token": tok})).status_code == 200
    assert calls == 0


async def test_metrics_cardinality_is_bounded_by_routes(live: Live) -> None:
    before = len((await live.http.get("/metrics")).text)
    for i in range(20):
        await live.http.get(f"/v1/tasks/tsk_{i}")
        await live.http.get(f"/nowhere/{i}")
        await live.http.get(f"/v1/admin/agents/spiffe://taskbound.local/a{i}", headers=live.admin)
    after = (await live.http.get("/metrics")).text
    assert "tsk_1" not in after
    assert "nowhere" not in after
    assert "/a1" not in after
    assert len(after) - before < 20_000


# --- the replay cache --------------------------------------------------------------------


async def test_unregistered_workload_cannot_lock_out_registered_agents(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same cache with a small capacity (the default is 1,000,000), to keep this fast.
    monkeypatch.setattr(live.services.broker, "_replay", MemoryReplayCache(max_entries=20))
    stranger = await live.agent("spiffe://taskbound.local/not/registered")
    rs = await asyncio.gather(*(stranger.call("POST", "/v1/tasks", json=BODY) for _ in range(20)))
    assert {r.status_code for r in rs} == {403}  # it may not start anything...
    victim = await live.agent(AGENT)
    r = await victim.call("POST", "/v1/tasks", json=BODY)
    assert r.status_code == 201, r.text  # ...and must not stop anyone else


async def test_refusals_reveal_nothing(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    await check_tokens_never_reach_the_logs(live, caplog)
    await check_errors_do_not_reveal_why_a_token_failed(live)
