"""DPoP server nonces; a proof replayed at another replica, caught through the shared
Redis replay cache; and the gateway running on its own (`taskbound gateway`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from taskbound.api.app import create_app
from taskbound.core.clock import FakeClock
from tests.api.conftest import AGENT, Agent, Live, free_port, make_settings, start_live
from tests.services import postgres_url, redis_url
from tests.storage.conftest import postgres_schema

from .conftest import Echo, call_headers, echo_app, registry, serve

LIST = "/issues/repos/acme/web/issues"


@contextlib.asynccontextmanager
async def echo_upstream() -> AsyncIterator[Echo]:
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    server, task = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))
    try:
        yield echo
    finally:
        server.should_exit = True
        await task


async def task_on(live: Live, echo: Echo) -> tuple[Agent, str]:
    doc = registry(echo.base, "http://127.0.0.1:9/mcp", live.base)
    assert (
        await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
    ).status_code == 200
    agent = await live.agent()
    r = await agent.start(
        intent={"purpose": "p", "constraints": {"org": "acme", "repo": "web"}},
        scopes=[{"tool": "issues", "tier": "read"}],
    )
    assert r.status_code == 201, r.text
    return agent, r.json()["credentials"][0]["access_token"]


async def test_server_nonces(tmp_path: Path, clock: FakeClock) -> None:
    settings = make_settings(tmp_path, gateway={"require_dpop_nonce": True})
    async with echo_upstream() as echo:
        async for live in start_live(settings, clock, registry=False):
            agent, token = await task_on(live, echo)
            r = await live.http.get(LIST, headers=call_headers(agent, token, "GET", LIST))
            assert r.status_code == 401
            assert r.json()["code"] == "use_dpop_nonce"
            assert 'error="use_dpop_nonce"' in r.headers["www-authenticate"]
            nonce = r.headers["dpop-nonce"]
            r = await live.http.get(
                LIST, headers=call_headers(agent, token, "GET", LIST, nonce=nonce)
            )
            assert r.status_code == 200, r.text
            r = await live.http.get(
                LIST, headers=call_headers(agent, token, "GET", LIST, nonce="forged")
            )
            assert r.status_code == 401
            assert len(echo.seen) == 1


async def test_a_proof_replayed_at_another_replica_is_caught(
    tmp_path: Path, clock: FakeClock
) -> None:
    with postgres_schema(postgres_url()) as url:
        one = make_settings(
            tmp_path,
            storage={"url": url},
            dpop={"replay_cache": "redis", "redis_url": redis_url()},
        )
        one = one.model_copy(
            update={"server": one.server.model_copy(update={"public_url": one.public_url})}
        )
        two = one.model_copy(update={"server": one.server.model_copy(update={"port": free_port()})})
        async with echo_upstream() as echo, contextlib.AsyncExitStack() as stack:
            lives = []
            for settings, reg in ((one, False), (two, False)):
                gen = start_live(settings, clock, registry=reg)
                lives.append(await gen.__anext__())
                stack.push_async_callback(gen.aclose)
            a, b = lives
            agent, token = await task_on(a, echo)
            headers = call_headers(agent, token, "GET", LIST)
            assert (await a.http.get(LIST, headers=headers)).status_code == 200
            r = await b.http.get(LIST, headers=headers)  # the same proof, at the other replica
            assert r.status_code == 401
            assert r.json()["code"] == "invalid_dpop_proof"
            assert len(echo.seen) == 1


async def test_the_gateway_runs_alone(tmp_path: Path, clock: FakeClock) -> None:
    settings = make_settings(tmp_path)
    async with echo_upstream() as echo:
        async for live in start_live(settings, clock, registry=False):
            agent, token = await task_on(live, echo)
            # A gateway-only app on the same services: tools and health, no broker API.
            app = create_app(settings, services=live.services, sweep=False, broker=False)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=live.base) as gw:
                r = await gw.get(LIST, headers=call_headers(agent, token, "GET", LIST))
                assert r.status_code == 200, r.text
                assert (await gw.post("/v1/tasks", json={})).status_code == 404
                assert (await gw.get("/healthz")).json() == {"status": "ok"}
                assert (await gw.get(f"/v1/admin/agents/{AGENT}")).status_code == 404
