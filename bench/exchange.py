"""Benchmark: delegation by token exchange (RFC 8693).

Prints exchanges/s of one task credential to a delegate, one after another and 16 at a
time:

1. through the broker service, no HTTP (subject credential verified, both DPoP proofs
   verified and spent in the replay cache, the actor's JWT-SVID verified, the chain's
   liveness read, narrowing, the Cedar grant decision for the delegate, minting, one write
   transaction recording the child under its parent), on SQLite (a temporary file) and,
   with --postgres, on PostgreSQL (a fresh schema, dropped afterwards);
2. over HTTP on loopback, against `taskbound serve` running in another process on SQLite.

The raw limit, measured in the same run: signatures per second over the signing input of
a real delegated credential (header.payload, about 1 KB) with a bare key of the same type
as the broker's credential key (Ed25519 by default). Ratios travel between machines;
absolute rates do not. Client-side proof making is done before each measurement starts.
Bounded in exchanges and in time per measurement.

    .venv/bin/python bench/exchange.py [--exchanges 300] [--seconds 20] [--postgres URL]
                                       [--no-http]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from taskbound.config import Settings, load_settings
from taskbound.core.clock import SystemClock
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.exchange import ACCESS_TOKEN_TYPE, GRANT_TYPE, JWT_TOKEN_TYPE, Narrowing
from taskbound.core.grant import ScopeRequest
from taskbound.core.identity import mint_jwt_svid
from taskbound.core.keys import PrivateKey, generate_key
from taskbound.core.model import KeyPurpose, Tier
from taskbound.core.secretbox import generate_kek
from taskbound.service.broker import ExchangeRequest, StartTaskRequest
from taskbound.service.registry import RegistryDocument
from taskbound.service.runtime import Services, open_services

ROOT = Path(__file__).resolve().parents[1]
ORCH = "spiffe://taskbound.local/agents/orchestrator"
SUB = "spiffe://taskbound.local/agents/sub"
CONCURRENCY = 16
MAX_EXCHANGES = 5000
# Proofs are made before a measurement starts and stay acceptable for the DPoP window (60 s).
MAX_SECONDS = 45.0
CEILING = [{"tool": "issues", "tier": "read"}]
REGISTRY: dict[str, Any] = {
    "owners": [{"id": "alice", "contact": "alice@example.com"}],
    "tools": [
        {
            "id": "issues",
            "audience": "https://gw.example/issues",
            "upstream_url": "https://upstream.example",
            "actions": [
                {"name": "list", "tier": "read", "method": "GET", "path": "/r/{repo}/issues"},
                {"name": "get", "tier": "read", "method": "GET", "path": "/r/{repo}/issues/{n}"},
            ],
        }
    ],
    "agents": [
        {"spiffe_id": ORCH, "owner": "alice", "ceiling": CEILING},
        {"spiffe_id": SUB, "owner": "alice", "ceiling": CEILING},
    ],
}
CONSTRAINTS: dict[str, Any] = {"repo": ["web", "api"], "tiers": ["read"]}
INTENT: dict[str, Any] = {"purpose": "bench", "constraints": CONSTRAINTS}


@dataclass
class Rate:
    label: str
    count: int
    elapsed: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.count / self.elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_signs_per_second(alg: str, message: bytes, seconds: float = 1.0) -> float:
    """The raw limit: signatures over ``message`` per second with a bare key for ``alg``."""
    sign: Callable[[], bytes]
    if alg == "EdDSA":
        ed = Ed25519PrivateKey.generate()

        def sign() -> bytes:
            return ed.sign(message)
    else:
        p256 = ec.generate_private_key(ec.SECP256R1())
        algorithm = ec.ECDSA(hashes.SHA256())

        def sign() -> bytes:
            return p256.sign(message, algorithm)

    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            sign()
        n += 100
    return n / (time.perf_counter() - start)


def proof(key: PrivateKey, url: str, access_token: str | None = None) -> str:
    return make_dpop_proof(
        key,
        method="POST",
        url=url,
        now=datetime.now(UTC),
        jti=secrets.token_urlsafe(16),
        access_token=access_token,
    )


async def measure(
    label: str,
    jobs: Sequence[Callable[[], Awaitable[str]]],
    concurrency: int,
    seconds: float,
) -> tuple[Rate, str]:
    """Run ``jobs`` (each one exchange, returning the issued token) ``concurrency`` at a
    time until done or ``seconds`` have passed; the rate, and one issued token."""
    pending: Iterator[Callable[[], Awaitable[str]]] = iter(jobs)
    latencies: list[float] = []
    issued: list[str] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        for job in pending:  # one iterator shared by the workers
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            issued.append(await job())
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Rate(label, len(latencies), time.perf_counter() - start, latencies), issued[-1]


# --- 1. the broker service, no HTTP --------------------------------------------------------


async def bench_service(settings: Settings, n: int, seconds: float) -> tuple[list[Rate], str]:
    clock = SystemClock()
    services: Services = await open_services(settings, clock=clock)
    try:
        await services.registry.apply(RegistryDocument.model_validate(REGISTRY))
        broker = services.broker
        token_url = settings.public_url + "/oauth/token"
        identity_key = services.keys.signer(KeyPurpose.DEV_IDENTITY)

        def svid(spiffe_id: str) -> str:
            return mint_jwt_svid(
                identity_key,
                spiffe_id=spiffe_id,
                audience=settings.identity_audience,
                now=clock.now(),
                ttl=timedelta(minutes=30),
                jti=secrets.token_urlsafe(8),
            )

        orch_key, sub_key = generate_key("EdDSA"), generate_key("EdDSA")
        caller = await broker.authenticate_agent(
            identity_token=svid(ORCH),
            dpop_headers=[proof(orch_key, settings.public_url + "/v1/tasks")],
            method="POST",
            path="/v1/tasks",
        )
        started = await broker.start_task(
            caller,
            StartTaskRequest(
                purpose="bench",
                constraints=CONSTRAINTS,
                on_behalf_of="alice",
                scopes=(ScopeRequest("issues", Tier.READ),),
                ttl_seconds=900,
            ),
        )
        parent = started.credentials[0].access_token
        actor = svid(SUB)

        def job() -> Callable[[], Awaitable[str]]:
            req = ExchangeRequest(
                subject_token=parent,
                subject_token_type=ACCESS_TOKEN_TYPE,
                actor_token=actor,
                actor_token_type=JWT_TOKEN_TYPE,
                requested_token_type=None,
                narrowing=Narrowing(scope="list"),
                dpop_headers=(proof(sub_key, token_url),),
                subject_dpop=proof(orch_key, token_url, access_token=parent),
            )

            async def run() -> str:
                return (await broker.exchange(req, {})).credential.access_token

            return run

        name = "postgres" if settings.storage_url.startswith("postgresql") else "sqlite"
        await measure("warm-up", [job() for _ in range(10)], 1, seconds)
        rates = []
        child = ""
        for concurrency in (1, CONCURRENCY):
            jobs = [job() for _ in range(n)]
            label = f"service {name:8} concurrency {concurrency:2}"
            rate, child = await measure(label, jobs, concurrency, seconds)
            rates.append(rate)
        return rates, child
    finally:
        await services.aclose()


def settings_for(data_dir: Path, storage_url: str | None = None) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "server": {"port": free_port(), "sweep_interval_seconds": 3600},
            "storage": {"data_dir": str(data_dir), **({"url": storage_url} if storage_url else {})},
            "keys": {"kek": generate_kek()},
            "dpop": {"replay_cache_max_entries": 100_000},
        },
    )


@contextlib.contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh schema on ``base_url``'s database, dropped afterwards; a URL using it."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"tb_bench_{secrets.token_hex(6)}"
    conninfo = make_url(base_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield (
            make_url(base_url)
            .update_query_dict({"options": f"-csearch_path={name}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


# --- 2. over HTTP, against `taskbound serve` in another process ----------------------------


@contextlib.asynccontextmanager
async def serve(tmp: Path) -> AsyncIterator[tuple[str, str]]:
    """`taskbound serve` on a free loopback port; its base URL and an admin token."""
    port = free_port()
    config = tmp / "taskbound.toml"
    config.write_text(
        "\n".join(
            [
                "[server]",
                'host = "127.0.0.1"',
                f"port = {port}",
                "sweep_interval_seconds = 3600",
                "[storage]",
                f"data_dir = {json.dumps(str(tmp / 'serve'))}",
                "[keys]",
                f"kek = {json.dumps(generate_kek())}",
                "[dpop]",
                "replay_cache_max_entries = 100000",
                "[logging]",
                'level = "error"',
            ]
        )
        + "\n"
    )
    cli = [sys.executable, "-m", "taskbound.cli.main"]
    log = tmp / "serve.log"  # a file, not a pipe nobody reads while the server runs
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # Our own interpreter and module, started once, outside the measurement.
    with log.open("wb") as err:
        server = subprocess.Popen(  # noqa: ASYNC220, S603
            [*cli, "serve", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            deadline = time.monotonic() + 30
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"taskbound serve exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("taskbound serve did not become ready in 30 s")
                await asyncio.sleep(0.1)
        init = await asyncio.to_thread(
            subprocess.run,
            [*cli, "admin", "init", "--config", str(config), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        yield base, json.loads(init.stdout)["token"]
    finally:
        server.terminate()
        try:
            await asyncio.to_thread(server.wait, 10)
        except subprocess.TimeoutExpired:
            server.kill()
            await asyncio.to_thread(server.wait)


async def bench_http(n: int, seconds: float) -> list[Rate]:
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            serve(Path(tmp)) as (base, admin_token),
            httpx.AsyncClient(
                base_url=base, limits=httpx.Limits(max_connections=CONCURRENCY)
            ) as http,
        ):
            admin = {"Authorization": f"Bearer {admin_token}"}
            r = await http.post("/v1/admin/apply", json=REGISTRY, headers=admin)
            r.raise_for_status()
            meta = (await http.get("/.well-known/oauth-authorization-server")).json()
            token_url = meta["token_endpoint"]

            async def identity(spiffe_id: str) -> str:
                r = await http.post(
                    "/v1/admin/dev/identity",
                    json={"spiffe_id": spiffe_id, "ttl_seconds": 1800},
                    headers=admin,
                )
                r.raise_for_status()
                return str(r.json()["token"])

            orch_key, sub_key = generate_key("EdDSA"), generate_key("EdDSA")
            r = await http.post(
                "/v1/tasks",
                json={
                    "intent": INTENT,
                    "on_behalf_of": "alice",
                    "scopes": [{"tool": "issues", "tier": "read"}],
                    "ttl_seconds": 900,
                },
                headers={
                    "Authorization": f"Bearer {await identity(ORCH)}",
                    "DPoP": proof(orch_key, meta["issuer"] + "/v1/tasks"),
                },
            )
            r.raise_for_status()
            parent = r.json()["credentials"][0]["access_token"]
            actor = await identity(SUB)

            def job() -> Callable[[], Awaitable[str]]:
                form = {
                    "grant_type": GRANT_TYPE,
                    "subject_token": parent,
                    "subject_token_type": ACCESS_TOKEN_TYPE,
                    "subject_dpop": proof(orch_key, token_url, access_token=parent),
                    "actor_token": actor,
                    "actor_token_type": JWT_TOKEN_TYPE,
                    "scope": "list",
                }
                headers = {"DPoP": proof(sub_key, token_url)}

                async def run() -> str:
                    r = await http.post("/oauth/token", data=form, headers=headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"exchange refused: {r.status_code} {r.text}")
                    return str(r.json()["access_token"])

                return run

            await measure("warm-up", [job() for _ in range(10)], 1, seconds)
            rates = []
            for concurrency in (1, CONCURRENCY):
                jobs = [job() for _ in range(n)]
                label = f"http    serve    concurrency {concurrency:2}"
                rates.append((await measure(label, jobs, concurrency, seconds))[0])
            return rates


# --- the report ----------------------------------------------------------------------------


def pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    return statistics.quantiles(values, n=100)[p - 1] * 1000


async def bench(n: int, seconds: float, postgres: str | None, http: bool) -> None:
    rates: list[Rate] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp) / "data")
        sqlite_rates, child = await bench_service(settings, n, seconds)
        rates += sqlite_rates
    if postgres:
        with tempfile.TemporaryDirectory() as tmp, postgres_schema(postgres) as url:
            rates += (await bench_service(settings_for(Path(tmp), url), n, seconds))[0]
    if http:
        rates += await bench_http(n, seconds)

    header = json.loads(_b64(child.split(".")[0]))
    alg = header["alg"]
    signing_input = child.rsplit(".", 1)[0].encode()
    raw = raw_signs_per_second(alg, signing_input)

    key_name = "Ed25519" if alg == "EdDSA" else "P-256"
    print(f"token exchange (RFC 8693), up to {n} exchanges or {seconds:g} s per measurement")
    print(
        f"  raw {key_name} signing of a delegated credential "
        f"({len(signing_input)} bytes)  {raw:10.0f} signatures/s"
    )
    for rate in rates:
        lat = f"p50 {pct(rate.latencies, 50):7.2f} ms  p99 {pct(rate.latencies, 99):7.2f} ms"
        print(f"  {rate.label}  {rate.per_second:9.1f} exchanges/s   {lat}  ({rate.count})")
    for rate in rates:
        print(f"  ratio raw signing / {rate.label}  {raw / rate.per_second:8.1f}x")


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def main() -> None:
    logging.getLogger("taskbound").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="EdDSA is deprecated")
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=300, help="per measurement (bounded)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement (bounded)")
    parser.add_argument("--postgres", help="also on PostgreSQL at this URL (a fresh schema)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP measurement")
    args = parser.parse_args()
    asyncio.run(
        bench(
            max(1, min(args.exchanges, MAX_EXCHANGES)),
            max(0.1, min(args.seconds, MAX_SECONDS)),
            args.postgres,
            not args.no_http,
        )
    )


if __name__ == "__main__":
    main()
