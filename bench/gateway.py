"""Benchmark: the gateway.

In one run:
1. a real upstream (its own process) called directly, and through `taskbound serve` (its
   own process): latency p50/p99 at concurrency 1 and 64, and throughput;
2. in process, the per-call check cost (credential from cache, DPoP proof with replay
   check, liveness from memory, action mapping, Cedar decision, audit append) against the
   sum of its irreducible parts measured alone: one DPoP signature verification + one
   cached Cedar decision + one audit append.

Bounded in requests and time; loopback only.

    .venv/bin/python bench/gateway.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from taskbound.core.dpop import make_dpop_proof, verify_dpop_proof
from taskbound.core.keys import generate_key
from taskbound.core.secretbox import generate_kek

UPSTREAM = """
import uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})
uvicorn.run(app, host="127.0.0.1", port=%d, log_level="error", access_log=False)
"""


def bench_policies(tmp: Path) -> Path:
    """The default pack without its example gates: the runaway brake (600 calls a minute
    per task) would, rightly, stop a benchmark's single task."""
    from taskbound.service.policy import default_policy_dir

    pack = tmp / "policies"
    pack.mkdir()
    for f in default_policy_dir().glob("*.cedar"):
        if f.name != "gates.cedar":
            (pack / f.name).write_text(f.read_text())
    return pack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] * 1000


async def load(n: int, concurrency: int, send: Any) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            t0 = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[tuple[str, str, dict[str, str]]]:
    """A real upstream and `taskbound serve`, each its own process on loopback, on a fresh
    data directory: (the server's base URL, the upstream's, an admin token's headers)."""
    tmp = Path(tempfile.mkdtemp())
    up_port, gw_port = free_port(), free_port()
    env = {
        **os.environ,
        "TASKBOUND_SERVER__PORT": str(gw_port),
        "TASKBOUND_STORAGE__DATA_DIR": str(tmp / "data"),
        "TASKBOUND_KEYS__KEK": generate_kek(),
        "TASKBOUND_LOGGING__LEVEL": "error",
        "TASKBOUND_POLICY__WATCH": "false",
        "TASKBOUND_POLICY__DIR": str(bench_policies(tmp)),
    }
    exe = Path(sys.executable).with_name("taskbound")
    # Processes of our own code and command, started before the event loop is busy.
    procs = [
        subprocess.Popen([sys.executable, "-c", UPSTREAM % up_port]),  # noqa: S603, ASYNC220
        subprocess.Popen([str(exe), "serve"], env=env),  # noqa: S603, ASYNC220
    ]
    try:
        base, upstream = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{up_port}"
        await wait_http(upstream + "/")
        await wait_http(base + "/healthz")
        init = await asyncio.create_subprocess_exec(
            str(exe), "admin", "init", "--json", env=env, stdout=asyncio.subprocess.PIPE
        )
        token = json.loads((await init.communicate())[0])["token"]
        yield base, upstream, {"Authorization": f"Bearer {token}"}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


async def end_to_end(requests: int) -> None:
    async with served() as (base, upstream, admin):
        agent = "spiffe://taskbound.local/agents/bench"
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
                    "spiffe_id": agent,
                    "owner": "alice",
                    "ceiling": [{"tool": "echo", "tier": "read"}],
                }
            ],
        }
        key = generate_key("EdDSA")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as http:
            async with http.post(base + "/v1/admin/apply", json=doc, headers=admin) as r:
                assert r.status == 200, await r.text()
            async with http.post(
                base + "/v1/admin/dev/identity", json={"spiffe_id": agent}, headers=admin
            ) as r:
                svid = (await r.json())["token"]

            def proof(method: str, url: str, access_token: str | None = None) -> str:
                from datetime import UTC, datetime

                return make_dpop_proof(
                    key,
                    method=method,
                    url=url,
                    now=datetime.now(UTC),
                    jti=secrets.token_urlsafe(16),
                    access_token=access_token,
                )

            body = {
                "intent": {"purpose": "bench"},
                "on_behalf_of": "alice",
                "scopes": [{"tool": "echo", "tier": "read"}],
                "ttl_seconds": 3600,
            }
            async with http.post(
                base + "/v1/tasks",
                json=body,
                headers={
                    "Authorization": f"Bearer {svid}",
                    "DPoP": proof("POST", base + "/v1/tasks"),
                },
            ) as r:
                cred = (await r.json())["credentials"][0]["access_token"]

            async def direct() -> None:
                async with http.get(upstream + "/items/7") as r:
                    await r.read()
                    assert r.status == 200

            async def via() -> None:
                url = base + "/echo/items/7"
                async with http.get(
                    url, headers={"Authorization": f"DPoP {cred}", "DPoP": proof("GET", url, cred)}
                ) as r:
                    await r.read()
                    assert r.status == 200, r.status

            print(f"end to end on loopback, {requests} requests per row (client in this process)")
            for conc in (1, 64):
                d_lat, d_time = await load(requests, conc, direct)
                g_lat, g_time = await load(requests, conc, via)
                row = "  concurrency {:3}: {:7} p50 {:6.2f} ms  p99 {:6.2f} ms  {:7.0f} req/s"
                print(row.format(conc, "direct", pct(d_lat, 50), pct(d_lat, 99), requests / d_time))
                print(
                    row.format(conc, "gateway", pct(g_lat, 50), pct(g_lat, 99), requests / g_time)
                )
                added_50 = pct(g_lat, 50) - pct(d_lat, 50)
                added_99 = pct(g_lat, 99) - pct(d_lat, 99)
                added = f"p50 {added_50:.2f} ms, p99 {added_99:.2f} ms"
                print(f"  concurrency {conc:3}: the gateway adds {added}")


async def in_process(n: int) -> None:
    """The per-call check cost against its irreducible parts, in one process."""
    from datetime import UTC, datetime

    from taskbound.config import load_settings
    from taskbound.core.clock import SystemClock
    from taskbound.core.decisions import Situation
    from taskbound.core.grant import ScopeRequest
    from taskbound.core.identity import mint_jwt_svid
    from taskbound.core.model import AuditEvent, KeyPurpose, Tier
    from taskbound.gateway.checks import Checks
    from taskbound.service.broker import StartTaskRequest
    from taskbound.service.registry import RegistryDocument
    from taskbound.service.runtime import open_services

    tmp = Path(tempfile.mkdtemp())
    settings = load_settings(
        environ={},
        overrides={
            "storage": {"data_dir": str(tmp / "data")},
            "keys": {"kek": generate_kek()},
            "policy": {"watch": False, "dir": str(bench_policies(tmp))},
            "dpop": {"replay_cache_max_entries": 100_000},
        },
    )
    clock = SystemClock()
    s = await open_services(settings, clock=clock)
    base = settings.public_url
    agent = "spiffe://taskbound.local/agents/bench"
    await s.registry.apply(
        RegistryDocument.model_validate(
            {
                "owners": [{"id": "alice", "contact": "a@example.com"}],
                "tools": [
                    {
                        "id": "echo",
                        "audience": f"{base}/echo",
                        "upstream_url": "http://127.0.0.1:9",
                        "actions": [
                            {"name": "get", "tier": "read", "method": "GET", "path": "/items/{id}"}
                        ],
                    }
                ],
                "agents": [
                    {
                        "spiffe_id": agent,
                        "owner": "alice",
                        "ceiling": [{"tool": "echo", "tier": "read"}],
                    }
                ],
            }
        )
    )
    key = generate_key("EdDSA")
    svid = mint_jwt_svid(
        s.keys.signer(KeyPurpose.DEV_IDENTITY),
        spiffe_id=agent,
        audience=settings.identity_audience,
        now=clock.now(),
        ttl=timedelta(hours=1),
        jti="b",
    )

    def proof(method: str, url: str, token: str | None = None) -> str:
        return make_dpop_proof(
            key,
            method=method,
            url=url,
            now=clock.now(),
            jti=secrets.token_urlsafe(16),
            access_token=token,
        )

    caller = await s.broker.authenticate_agent(
        identity_token=svid,
        dpop_headers=[proof("POST", base + "/v1/tasks")],
        method="POST",
        path="/v1/tasks",
    )
    started = await s.broker.start_task(
        caller, StartTaskRequest("bench", {}, "alice", (ScopeRequest("echo", Tier.READ),), 3600)
    )
    token = started.credentials[0].access_token
    tool = await s.storage.get_tool("echo")
    assert tool is not None
    checks = Checks(settings, s.storage, s.keys, s.policy, s.replay, clock, s.events, s.revocations)
    from taskbound.core.actions import HttpRouter

    router = HttpRouter.for_tool(tool)
    url = base + "/echo/items/7"
    proofs = [proof("GET", url, token) for _ in range(n + 50)]
    event = AuditEvent(time=clock.now(), event="gateway.call", decision="allow", tool="echo")

    async def full(p: str) -> None:
        admitted = await checks.admit(
            authorization=f"DPoP {token}", dpop_headers=[p], method="GET", url=url, tool=tool
        )
        match = router.match("GET", "/items/7")
        checks.within_credential(match.action, admitted.claims)
        checks.decide(admitted, tool, match.action, match.params, "/items/7")
        await s.storage.append_audit(event)

    for p in proofs[:50]:  # warm caches (credential, liveness, entities)
        await full(p)
    t0 = time.perf_counter()
    for p in proofs[50:]:
        await full(p)
    per_call = (time.perf_counter() - t0) / n

    extra = [proof("GET", url, token) for _ in range(n)]
    t0 = time.perf_counter()
    for p in extra:
        verify_dpop_proof(
            p,
            method="GET",
            url=url,
            now=clock.now(),
            algorithms=("EdDSA",),
            iat_window=timedelta(seconds=60),
            access_token=token,
        )
    part_dpop = (time.perf_counter() - t0) / n
    admitted = await checks.admit(
        authorization=f"DPoP {token}",
        dpop_headers=[proof("GET", url, token)],
        method="GET",
        url=url,
        tool=tool,
    )
    live = admitted.live
    t0 = time.perf_counter()
    for _ in range(n):
        s.policy.decide_call(
            agent=live.agent,
            owner=live.owner,
            task=live.task,
            tool=tool,
            action_name="get",
            arguments={"id": "7"},
            target="/items/7",
            situation=Situation(now=datetime.now(UTC), environment="development"),
        )
    part_cedar = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        await s.storage.append_audit(event)
    part_audit = (time.perf_counter() - t0) / n
    parts = part_dpop + part_cedar + part_audit
    # The floor under any durable per-call record on this disk: one SQLite commit of one
    # tiny row with synchronous=FULL in WAL mode (what the audit append waits for), bare.
    import sqlite3

    raw = sqlite3.connect(tmp / "raw.db", isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("CREATE TABLE t (x INTEGER)")
    t0 = time.perf_counter()
    for i in range(min(n, 500)):
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO t VALUES (?)", (i,))
        raw.execute("COMMIT")
    raw_commit = (time.perf_counter() - t0) / min(n, 500)
    raw.close()
    await s.aclose()
    print(f"in process, {n} calls (SQLite audit, synchronous commit)")
    print(
        f"  parts: DPoP verify {part_dpop * 1e6:7.1f} us + Cedar {part_cedar * 1e6:7.1f} us"
        f" + audit append {part_audit * 1e6:7.1f} us = {parts * 1e6:7.1f} us"
    )
    print(f"  full per-call check                      {per_call * 1e6:7.1f} us")
    print(f"  ratio full / parts                       {per_call / parts:7.2f}x")
    print(f"  raw limit: one bare durable SQLite commit  {raw_commit * 1e6:7.1f} us")
    print(f"  ratio audit append / bare commit         {part_audit / raw_commit:7.2f}x")


def main() -> None:
    logging.getLogger("taskbound").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="EdDSA is deprecated")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per row (bounded)")
    args = parser.parse_args()
    n = max(100, min(args.requests, 20_000))
    asyncio.run(in_process(min(n, 2000)))
    asyncio.run(end_to_end(n))


if __name__ == "__main__":
    main()
