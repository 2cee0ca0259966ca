"""Benchmark: task start on the SQLite default.

Prints task starts/s and credentials/s — through the broker service (identity
verification, DPoP proof check and replay cache, grant decision, minting, one SQLite
transaction) and through the full HTTP stack on loopback — and the ratio to raw Ed25519
signing measured in the same run. Ratios travel between machines; absolute rates do not.

    .venv/bin/python bench/issue.py [--tasks 300]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from taskbound.api.app import create_app
from taskbound.config import load_settings
from taskbound.core.clock import SystemClock
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.grant import ScopeRequest
from taskbound.core.identity import mint_jwt_svid
from taskbound.core.keys import generate_key
from taskbound.core.model import KeyPurpose, Tier
from taskbound.core.secretbox import generate_kek
from taskbound.service.admin import create_admin_token
from taskbound.service.broker import StartTaskRequest
from taskbound.service.registry import RegistryDocument
from taskbound.service.runtime import open_services

AGENT = "spiffe://taskbound.local/agents/bench"
REGISTRY = {
    "owners": [{"id": "alice", "contact": "alice@example.com"}],
    "tools": [
        {
            "id": f"tool{i}",
            "audience": f"https://gw.example/tool{i}",
            "upstream_url": "https://upstream.example",
            "actions": [
                {"name": "get", "tier": "read", "method": "GET", "path": "/x/{id}"},
                {"name": "put", "tier": "write", "method": "PUT", "path": "/x/{id}"},
            ],
        }
        for i in range(2)
    ],
    "agents": [
        {
            "spiffe_id": AGENT,
            "owner": "alice",
            "ceiling": [
                {"tool": f"tool{i}", "tier": t} for i in range(2) for t in ("read", "write")
            ],
        }
    ],
}
SCOPES = [{"tool": f"tool{i}", "tier": t} for i in range(2) for t in ("read", "write")]


def raw_ed25519_signs_per_second(seconds: float = 1.0) -> float:
    """The raw limit: Ed25519 signatures of a credential-sized message per second."""
    key = Ed25519PrivateKey.generate()
    message = os.urandom(700)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            key.sign(message)
        n += 200
    return n / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bench(tasks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            environ={},
            overrides={
                "server": {"port": free_port(), "sweep_interval_seconds": 3600},
                "storage": {
                    "data_dir": str(Path(tmp) / "data"),
                    **(
                        {"url": os.environ["BENCH_STORAGE_URL"]}
                        if os.environ.get("BENCH_STORAGE_URL")
                        else {}
                    ),
                },
                "keys": {"kek": generate_kek()},
                "dpop": {"replay_cache_max_entries": 100_000},
            },
        )
        clock = SystemClock()
        services = await open_services(settings, clock=clock)
        await services.registry.apply(RegistryDocument.model_validate(REGISTRY))
        app = create_app(settings, services=services, sweep=False)
        base = settings.public_url
        identity_key = services.keys.signer(KeyPurpose.DEV_IDENTITY)
        svid = mint_jwt_svid(
            identity_key,
            spiffe_id=AGENT,
            audience=settings.identity_audience,
            now=clock.now(),
            ttl=timedelta(hours=1),
            jti="bench",
        )
        dpop_key = generate_key("EdDSA")

        def proof() -> str:
            return make_dpop_proof(
                dpop_key,
                method="POST",
                url=f"{base}/v1/tasks",
                now=clock.now(),
                jti=secrets.token_urlsafe(16),
            )

        request = StartTaskRequest(
            purpose="bench",
            constraints={"repo": "acme/web", "tiers": ["read", "write"]},
            on_behalf_of="alice",
            scopes=tuple(ScopeRequest(s["tool"], Tier(s["tier"])) for s in SCOPES),
            ttl_seconds=600,
        )

        raw = raw_ed25519_signs_per_second()

        # 1. The broker service, no HTTP.
        latencies = []
        start = time.perf_counter()
        for _ in range(tasks):
            t0 = time.perf_counter()
            caller = await services.broker.authenticate_agent(
                identity_token=svid, dpop_headers=[proof()], method="POST", path="/v1/tasks"
            )
            started = await services.broker.start_task(caller, request)
            assert len(started.credentials) == len(SCOPES)
            latencies.append(time.perf_counter() - t0)
        svc_elapsed = time.perf_counter() - start

        # 2. The whole HTTP stack on loopback.
        server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=settings.server.port, log_config=None, lifespan="off"
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        await create_admin_token(services.storage, clock, "bench")
        body = {
            "intent": {
                "purpose": "bench",
                "constraints": {"repo": "acme/web", "tiers": ["read", "write"]},
            },
            "on_behalf_of": "alice",
            "scopes": SCOPES,
            "ttl_seconds": 600,
        }
        async with httpx.AsyncClient(base_url=base) as http:
            http_lat = []
            start = time.perf_counter()
            for _ in range(tasks):
                t0 = time.perf_counter()
                r = await http.post(
                    "/v1/tasks",
                    json=body,
                    headers={"Authorization": f"Bearer {svid}", "DPoP": proof()},
                )
                assert r.status_code == 201, r.text
                http_lat.append(time.perf_counter() - t0)
            http_elapsed = time.perf_counter() - start
        server.should_exit = True
        await serving
        await services.aclose()

    per_task = len(SCOPES)
    svc_tps, http_tps = tasks / svc_elapsed, tasks / http_elapsed

    def pct(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[int(p) - 1] * 1000

    print(f"task start on SQLite, {tasks} tasks, {per_task} credentials each")
    print(f"  raw Ed25519 signing           {raw:10.0f} signatures/s")
    svc_pcts = f"p50 {pct(latencies, 50):.2f} ms  p99 {pct(latencies, 99):.2f} ms"
    http_pcts = f"p50 {pct(http_lat, 50):.2f} ms  p99 {pct(http_lat, 99):.2f} ms"
    print(f"  service: tasks/s              {svc_tps:10.1f}   {svc_pcts}")
    print(f"  service: credentials/s        {svc_tps * per_task:10.1f}")
    print(f"  http:    tasks/s              {http_tps:10.1f}   {http_pcts}")
    print(f"  http:    credentials/s        {http_tps * per_task:10.1f}")
    print(f"  ratio raw signing / service credentials  {raw / (svc_tps * per_task):8.1f}x")
    print(f"  ratio raw signing / http credentials     {raw / (http_tps * per_task):8.1f}x")


def main() -> None:
    logging.getLogger("taskbound").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="EdDSA is deprecated")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks per measurement (bounded)")
    args = parser.parse_args()
    asyncio.run(bench(min(args.tasks, 5000)))


if __name__ == "__main__":
    main()
