"""A real server on loopback for end-to-end tests: uvicorn serving the app over HTTP, with a
fake clock shared by the server and the test's agents."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from taskbound.api.app import create_app
from taskbound.config import Settings, load_settings
from taskbound.core.clock import FakeClock
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.keys import PrivateKey, generate_key
from taskbound.core.secretbox import generate_kek
from taskbound.service.admin import create_admin_token
from taskbound.service.runtime import Services, open_services
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

AGENT = "spiffe://taskbound.local/agents/bot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    overrides: dict[str, Any] = {
        "server": {"port": free_port(), "sweep_interval_seconds": 3600},
        "storage": {"data_dir": str(tmp_path / "data")},
        "keys": {"kek": generate_kek()},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(environ={}, overrides=overrides)


@dataclass
class Live:
    base: str
    services: Services
    clock: FakeClock
    http: httpx.AsyncClient
    admin_token: str

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def identity(self, spiffe_id: str = AGENT, ttl: int = 300) -> str:
        r = await self.http.post(
            "/v1/admin/dev/identity",
            json={"spiffe_id": spiffe_id, "ttl_seconds": ttl},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    async def agent(self, spiffe_id: str = AGENT) -> Agent:
        return Agent(self, await self.identity(spiffe_id))


class Agent:
    """An agent as the SDK will be: identity token + in-memory DPoP key."""

    def __init__(self, live: Live, identity: str, key: PrivateKey | None = None) -> None:
        self.live = live
        self.identity = identity
        self.key = key or generate_key("EdDSA")

    def proof(self, method: str, path: str, **kw: Any) -> str:
        return make_dpop_proof(
            self.key,
            method=method,
            url=self.live.base + path,
            now=self.live.clock.now(),
            jti=secrets.token_urlsafe(16),
            **kw,
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        proof: str | None = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        h = {"Authorization": f"Bearer {self.identity}", "DPoP": proof or self.proof(method, path)}
        h.update(headers or {})
        return await self.live.http.request(method, path, headers=h, **kw)

    async def start(self, **body: Any) -> httpx.Response:
        payload = {
            "intent": {
                "purpose": "triage acme/web",
                "constraints": {"org": "acme", "repo": "web", "tiers": ["read", "write"]},
            },
            "on_behalf_of": "alice",
            "scopes": [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}],
            "ttl_seconds": 900,
        }
        payload.update(body)
        return await self.call("POST", "/v1/tasks", json=payload)


REGISTRY: dict[str, Any] = {
    "owners": [
        {"id": "alice", "contact": "alice@example.com", "roles": ["approver"]},
        {"id": "bob", "contact": "bob@example.com"},
    ],
    "tools": [
        {
            "id": "issues",
            "audience": "https://gw.example/issues",
            "upstream_url": "https://issues.example/api",
            "upstream_secret": "upstream-secret-never-returned",
            "actions": [
                {"name": "list", "tier": "read", "method": "GET", "path": "/issues"},
                {"name": "get", "tier": "read", "method": "GET", "path": "/issues/{n}"},
                {
                    "name": "comment",
                    "tier": "write",
                    "method": "POST",
                    "path": "/issues/{n}/comments",
                },
                {"name": "wipe", "tier": "admin", "method": "DELETE", "path": "/issues"},
            ],
        },
        {
            "id": "deploy",
            "audience": "https://gw.example/deploy",
            "upstream_url": "https://deploy.example/api",
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
            "ceiling": [{"tool": "issues", "tier": "read"}, {"tool": "issues", "tier": "write"}],
        }
    ],
}


async def start_live(
    settings: Settings, clock: FakeClock, *, registry: bool = True
) -> AsyncIterator[Live]:
    services = await open_services(settings, clock=clock)
    app = create_app(settings, services=services, sweep=False)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=settings.server.port, log_config=None, lifespan="off"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "server failed to start"
        await asyncio.sleep(0.01)
    token = (await create_admin_token(services.storage, clock, "tests")).token
    # Connect to this replica's own port; proofs and issuer use the shared public URL, as
    # behind a load balancer.
    direct = f"http://127.0.0.1:{settings.server.port}"
    async with httpx.AsyncClient(base_url=direct, timeout=10) as http:
        live = Live(settings.public_url, services, clock, http, token)
        if registry:
            r = await http.post("/v1/admin/apply", json=REGISTRY, headers=live.admin)
            assert r.status_code == 200, r.text
        try:
            yield live
        finally:
            server.should_exit = True
            await task
            await services.aclose()


@pytest.fixture(params=["sqlite", "postgres"])
async def live(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Live]:
    """A live server on each real backend: SQLite, and PostgreSQL in a fresh schema."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(postgres_schema(postgres_url()))
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
        settings = make_settings(tmp_path, storage={"url": url})
        async for live in start_live(settings, clock):
            yield live
