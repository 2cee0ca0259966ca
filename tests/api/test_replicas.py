"""Several server processes share one PostgreSQL: they agree on one signing key at first
start, and a task started through one replica is seen, ended and revoked through another.
Each replica has its own engine and connection pool, as separate processes would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from taskbound.core.clock import FakeClock
from taskbound.core.model import KeyPurpose
from taskbound.service.runtime import open_services
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

from .conftest import Agent, Live, free_port, make_settings, start_live


async def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path, clock: FakeClock) -> None:
    with postgres_schema(postgres_url()) as url:
        settings = make_settings(tmp_path, storage={"url": url})
        replicas = await asyncio.gather(*(open_services(settings, clock=clock) for _ in range(4)))
        try:
            kids = {r.keys.signer(KeyPurpose.CREDENTIALS).kid for r in replicas}
            assert len(kids) == 1
            dev_kids = {r.keys.signer(KeyPurpose.DEV_IDENTITY).kid for r in replicas}
            assert len(dev_kids) == 1
        finally:
            for r in replicas:
                await r.aclose()


async def test_a_task_lives_and_dies_across_replicas(tmp_path: Path, clock: FakeClock) -> None:
    with postgres_schema(postgres_url()) as url:
        one = make_settings(tmp_path, storage={"url": url})
        # Two replicas behind one load balancer: one public URL (the issuer), two ports.
        one = one.model_copy(
            update={"server": one.server.model_copy(update={"public_url": one.public_url})}
        )
        two = one.model_copy(update={"server": one.server.model_copy(update={"port": free_port()})})
        async with contextlib.AsyncExitStack() as stack:

            async def enter(gen: AsyncIterator[Live]) -> Live:
                live = await gen.__anext__()
                stack.push_async_callback(gen.aclose)
                return live

            a = await enter(start_live(one, clock))
            b = await enter(start_live(two, clock, registry=False))
            agent = await a.agent()
            task = (await agent.start()).json()
            token = task["credentials"][0]["access_token"]
            # B verifies A's credential (same key, read from the shared database).
            r = await b.http.post("/oauth/introspect", data={"token": token}, headers=b.admin)
            assert r.json()["active"] is True
            # The agent completes the task through B; A then sees it dead.
            on_b = Agent(b, agent.identity, agent.key)
            r = await on_b.call("POST", f"/v1/tasks/{task['id']}/complete")
            assert r.json()["state"] == "completed"
            r = await a.http.post("/oauth/introspect", data={"token": token}, headers=a.admin)
            assert r.json() == {"active": False}
            # A rotation on A reaches B at its next key reload.
            r = await a.http.post("/v1/admin/keys/rotate", headers=a.admin)
            new_kid = r.json()["kid"]
            await b.services.keys.reload()
            jwks = (await b.http.get("/.well-known/jwks.json")).json()
            assert new_kid in {k["kid"] for k in jwks["keys"]}
            task2 = (await Agent(b, agent.identity).start()).json()
            assert task2["state"] == "active"
