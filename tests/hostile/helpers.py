"""Small helpers shared by the hostile tests: forging JOSE objects and poking the server."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx

from tests.api.conftest import AGENT, Live

READ = {"tool": "issues", "tier": "read"}
WRITE = {"tool": "issues", "tier": "write"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def claims_of(token: str) -> dict[str, Any]:
    seg = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))))


def header_of(token: str) -> dict[str, Any]:
    seg = token.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))))


async def introspect(live: Live, token: str) -> dict[str, Any]:
    r = await live.http.post("/oauth/introspect", data={"token": token}, headers=live.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def put_agent(live: Live, **changes: Any) -> httpx.Response:
    spec: dict[str, Any] = {
        "spiffe_id": AGENT,
        "owner": "alice",
        "ceiling": [READ, WRITE],
    }
    spec.update(changes)
    return await live.http.put(f"/v1/admin/agents/{AGENT}", json=spec, headers=live.admin)


def assert_clean_refusal(r: httpx.Response, status: int | None = None) -> None:
    """A refusal is a 4xx problem/OAuth body; never a 5xx and never a stack trace."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    for needle in ("Traceback", 'File "', "sqlalchemy", "SELECT ", "INSERT "):
        assert needle not in r.text, r.text
