"""Benchmark: what the agent SDK costs over hand-made requests.

In one run, against a real `taskbound serve` (its own process) and a real upstream (its own
process), both with httpx at concurrency 1:

1. tool calls through the gateway: the SDK (`task.http(tool)`: credential lookup, a fresh
   DPoP proof per request, refusal check) against the raw limit — the same request with
   `Authorization` and `DPoP` headers made by hand with the same kind of key;
2. a task's life: `async with client.task(...)` (start, end on exit) against the raw
   `POST /v1/tasks` + `POST /v1/tasks/{id}/complete` with hand-made proofs.

Bounded in requests and time; loopback only.

    .venv/bin/python bench/sdk.py [--requests 500] [--tasks 50]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx

from gateway import served
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.keys import PrivateKey, generate_key
from taskbound.sdk import Client, StaticToken

AGENT = "spiffe://taskbound.local/agents/bench"


def _ed25519() -> PrivateKey:
    """The key the SDK makes by default: Ed25519 under its RFC 9864 name."""
    base = generate_key("EdDSA")
    return PrivateKey(kid=base.kid, alg="Ed25519", key=base.key)


def _proof(key: PrivateKey, method: str, url: str, token: str | None = None) -> str:
    return make_dpop_proof(
        key,
        method=method,
        url=url,
        now=datetime.now(UTC),
        jti=secrets.token_urlsafe(18),
        access_token=token,
    )


async def _timed(n: int, call: Callable[[], Awaitable[None]]) -> list[float]:
    for _ in range(min(20, n)):  # warm up: connections, caches
        await call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


def _line(label: str, values: list[float]) -> float:
    p50 = statistics.median(values) * 1000
    print(f"  {label:38} p50 {p50:7.3f} ms   {len(values) / sum(values):8.0f} /s")
    return p50


async def run(requests: int, tasks: int) -> None:
    async with served() as (base, upstream, admin):
        doc = {
            "owners": [{"id": "alice", "contact": "a@example.com"}],
            "tools": [
                {
                    "id": "echo",
                    "audience": f"{base}/echo",
                    "upstream_url": upstream,
                    "upstream_secret": "Bearer s",
                    "actions": [
                        {"name": "get", "tier": "read", "method": "GET", "path": "/items/{id}"}
                    ],
                }
            ],
            "agents": [
                {
                    "spiffe_id": AGENT,
                    "owner": "alice",
                    "ceiling": [{"tool": "echo", "tier": "read"}],
                }
            ],
        }
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(base + "/v1/admin/apply", json=doc, headers=admin)
            assert r.status_code == 200, r.text
            r = await http.post(
                base + "/v1/admin/dev/identity",
                json={"spiffe_id": AGENT, "ttl_seconds": 3600},
                headers=admin,
            )
            svid = r.json()["token"]
            body = {
                "intent": {"purpose": "bench"},
                "on_behalf_of": "alice",
                "scopes": [{"tool": "echo", "tier": "read"}],
                "ttl_seconds": 3600,
            }
            key = _ed25519()

            async def raw_start() -> tuple[str, str]:
                url = base + "/v1/tasks"
                headers = {"Authorization": f"Bearer {svid}", "DPoP": _proof(key, "POST", url)}
                r = await http.post(url, json=body, headers=headers)
                assert r.status_code == 201, r.text
                return r.json()["id"], r.json()["credentials"][0]["access_token"]

            async def raw_end(task_id: str) -> None:
                url = f"{base}/v1/tasks/{task_id}/complete"
                headers = {"Authorization": f"Bearer {svid}", "DPoP": _proof(key, "POST", url)}
                r = await http.post(url, json={}, headers=headers)
                assert r.status_code == 200, r.text

            raw_task, cred = await raw_start()
            url = base + "/echo/items/7"

            async def raw_call() -> None:
                headers = {"Authorization": f"DPoP {cred}", "DPoP": _proof(key, "GET", url, cred)}
                r = await http.get(url, headers=headers)
                assert r.status_code == 200, r.text

            print(f"taskbound SDK benchmark: {requests} calls, {tasks} task lives, concurrency 1")
            print("tool calls through the gateway")
            raw_calls = _line("raw limit: hand-made DPoP headers", await _timed(requests, raw_call))
            async with (
                Client(base, identity=StaticToken(svid), http=http) as client,
                client.task("bench", on_behalf_of="alice", scopes=[("echo", "read")]) as task,
                task.http("echo") as echo,
            ):

                async def sdk_call() -> None:
                    r = await echo.get("/items/7")
                    assert r.status_code == 200, r.text

                sdk_calls = _line("SDK: task.http(tool)", await _timed(requests, sdk_call))
            await raw_end(raw_task)

            print("a task's life (start, end)")

            async def raw_life() -> None:
                task_id, _ = await raw_start()
                await raw_end(task_id)

            async def sdk_life() -> None:
                async with client_for_lives.task(
                    "bench", on_behalf_of="alice", scopes=[("echo", "read")]
                ):
                    pass

            raw_lives = _line("raw limit: POST /v1/tasks + complete", await _timed(tasks, raw_life))
            async with Client(base, identity=StaticToken(svid), http=http) as client_for_lives:
                sdk_lives = _line("SDK: async with client.task(...)", await _timed(tasks, sdk_life))
        print(f"ratio SDK / raw (tool call, p50):  {sdk_calls / raw_calls:.2f}x")
        print(f"ratio SDK / raw (task life, p50):  {sdk_lives / raw_lives:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=50)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="EdDSA is deprecated via RFC 9864")
    asyncio.run(run(args.requests, args.tasks))


if __name__ == "__main__":
    main()
