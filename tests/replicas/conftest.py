"""Two replicas as in production: two real `taskbound serve` processes, each on its own
loopback port, sharing one PostgreSQL schema (created for the test, dropped after) and one
KEK, behind one public URL (as behind a load balancer), with a real HTTP upstream and a
registered tool, owner and agent.

A test asks for a :class:`Cluster` through ``make_cluster`` and may give replica B its own
revocation settings and a :class:`TcpProxy` to LISTEN through. Skipped without PostgreSQL
(failed when ``TASKBOUND_REQUIRE_SERVICES=1``). Server logs are printed at teardown, which
pytest shows only for a failed test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy.engine import make_url

from taskbound.core.clock import SystemClock
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.keys import PrivateKey, generate_key
from taskbound.core.secretbox import generate_kek
from taskbound.service.admin import create_admin_token
from taskbound.storage import open_storage
from tests.api.conftest import free_port
from tests.gateway.conftest import Echo, echo_app, serve
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

EXE = Path(sys.executable).with_name("taskbound")
# Both replicas answer for one public URL (issuer, audiences, DPoP `htu`); the tests reach
# each one at its own port, as a load balancer would.
PUBLIC = "http://gateway.taskbound.test"
AGENT = "spiffe://taskbound.local/agents/replica-bot"
CALL = "/echo/items/7"
START_TIMEOUT_S = 30.0
# Long enough that a liveness answer cached before a revocation cannot expire during a
# test: a refusal seen at B can then only come from B's revocation feed.
LIVENESS_TTL_S = 30.0


# --- a TCP proxy that can be cut -----------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy in front of ``target``. :meth:`cut` closes every connection and
    stops listening (new connections are refused); :meth:`restore` listens again on the
    same port. :meth:`pause` is a silent partition: connections stay open (new ones are
    accepted) but nothing gets through until :meth:`resume`, when what was held back flows,
    as after a network heals."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0

    async def restore(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for pipe in list(self._pipes):
            pipe.cancel()
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


def via_proxy(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    return (
        make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    )


# --- server processes ----------------------------------------------------------------------


@dataclass
class Replica:
    """One `taskbound serve` process (restartable) and an HTTP client to its port."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    http: httpx.AsyncClient | None = None
    _log: IO[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> httpx.AsyncClient:
        assert self.http is not None, f"replica {self.name} is not running"
        return self.http

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log = self.log_path.open("ab")
        self._log.write(f"----- {self.name} starting -----\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [str(EXE), "serve"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        # A new client per process: no keep-alive connection outlives a killed server.
        self.http = httpx.AsyncClient(base_url=self.base, timeout=10)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def ready(self, within: float = START_TIMEOUT_S) -> float:
        """Wait for /healthz; how long it took. Fails (with the log) if the process died."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if self.exited() is not None:
                pytest.fail(f"replica {self.name} exited ({self.exited()}):\n{self.logs()}")
            with contextlib.suppress(httpx.TransportError):
                if (await self.client.get("/healthz")).status_code == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.05)
        pytest.fail(f"replica {self.name} did not come up in {within} s:\n{self.logs()}")

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the database."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 10)
        await self._drop_client()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        await self._drop_client()

    async def _drop_client(self) -> None:
        http, self.http = self.http, None
        if http is not None:
            await http.aclose()
        if self._log is not None:
            self._log.close()
            self._log = None

    def logs(self, tail: int = 20_000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return text[-tail:]

    # --- what the tests ask a replica ----------------------------------------------------

    async def admin_get(self, path: str, token: str, **kw: Any) -> httpx.Response:
        return await self.client.get(path, headers={"Authorization": f"Bearer {token}"}, **kw)

    async def admin_post(self, path: str, token: str, **kw: Any) -> httpx.Response:
        return await self.client.post(path, headers={"Authorization": f"Bearer {token}"}, **kw)

    async def feed(self, token: str) -> dict[str, Any]:
        """This replica's revocation feed, as GET /v1/admin/revocations reports it."""
        r = await self.admin_get("/v1/admin/revocations", token, params={"limit": 1})
        assert r.status_code == 200, r.text
        feed: dict[str, Any] = r.json()["feed"]
        return feed

    async def metric(self, name: str) -> float:
        r = await self.client.get("/metrics")
        assert r.status_code == 200, r.text
        found = re.search(rf"^{re.escape(name)} (\S+)$", r.text, re.MULTILINE)
        assert found is not None, f"{name} not in /metrics:\n{r.text}"
        return float(found.group(1))


# --- the agent -----------------------------------------------------------------------------


@dataclass
class Task:
    id: str
    token: str  # the echo:read credential
    jti: str


@dataclass
class Agent:
    """An agent as the SDK is: a workload identity and a DPoP key, on real time (the
    servers run on the system clock)."""

    identity: str
    key: PrivateKey = field(default_factory=lambda: generate_key("EdDSA"))

    def proof(self, method: str, path: str, token: str | None = None) -> str:
        return make_dpop_proof(
            self.key,
            method=method,
            url=PUBLIC + path,
            now=datetime.now(UTC),
            jti=secrets.token_urlsafe(16),
            access_token=token,
        )

    async def try_start(self, at: Replica) -> httpx.Response:
        body = {
            "intent": {"purpose": "replica test"},
            "on_behalf_of": "alice",
            "scopes": [{"tool": "echo", "tier": "read"}],
            "ttl_seconds": 900,
        }
        headers = {
            "Authorization": f"Bearer {self.identity}",
            "DPoP": self.proof("POST", "/v1/tasks"),
        }
        return await at.client.post("/v1/tasks", json=body, headers=headers)

    async def start(self, at: Replica) -> Task:
        r = await self.try_start(at)
        assert r.status_code == 201, r.text
        cred = r.json()["credentials"][0]
        return Task(r.json()["id"], cred["access_token"], cred["jti"])

    async def fresh_credential(self, at: Replica, task: Task) -> Task:
        """Another credential for the same task."""
        path = f"/v1/tasks/{task.id}/credentials"
        headers = {"Authorization": f"Bearer {self.identity}", "DPoP": self.proof("POST", path)}
        r = await at.client.post(path, json={"tool": "echo", "tier": "read"}, headers=headers)
        assert r.status_code == 201, r.text
        return Task(task.id, r.json()["access_token"], r.json()["jti"])

    async def call(self, at: Replica, token: str, *, answer_within: float = 10) -> httpx.Response:
        """One call through ``at``'s gateway to the echo upstream."""
        headers = {"Authorization": f"DPoP {token}", "DPoP": self.proof("GET", CALL, token)}
        return await at.client.get(CALL, headers=headers, timeout=answer_within)


def code(r: httpx.Response) -> str | None:
    """The problem code of a refusal."""
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


async def first(
    call: Callable[[], Awaitable[httpx.Response]],
    accept: Callable[[httpx.Response], bool],
    *,
    within: float,
    every: float = 0.01,
    allowed: Callable[[httpx.Response], bool] | None = None,
) -> tuple[httpx.Response, float, list[int]]:
    """Call until a response is accepted, for at most ``within`` seconds; returns it, the
    seconds it took and every status seen. Fails on a response neither accepted nor
    ``allowed`` (when given), and on the timeout."""
    started = time.monotonic()
    seen: list[int] = []
    while True:
        r = await call()
        seen.append(r.status_code)
        elapsed = time.monotonic() - started
        if accept(r):
            return r, elapsed, seen
        if allowed is not None and not allowed(r):
            pytest.fail(f"unexpected answer after {elapsed:.3f} s: {r.status_code} {r.text}")
        if elapsed > within:
            pytest.fail(
                f"not seen within {within} s; last {r.status_code} {r.text}; statuses {seen[-20:]}"
            )
        await asyncio.sleep(every)


# --- the cluster ---------------------------------------------------------------------------


@dataclass
class Cluster:
    a: Replica
    b: Replica
    echo: Echo
    admin_token: str
    url: str  # the PostgreSQL URL of the test schema

    async def agent(self) -> Agent:
        body = {"spiffe_id": AGENT, "ttl_seconds": 600}
        r = await self.a.admin_post("/v1/admin/dev/identity", self.admin_token, json=body)
        assert r.status_code == 201, r.text
        return Agent(r.json()["token"])

    async def revoke_task(self, at: Replica, task: Task) -> None:
        r = await at.admin_post(f"/v1/admin/tasks/{task.id}/revoke", self.admin_token)
        assert r.status_code == 200, r.text
        assert r.json()["changed"] is True

    async def revoke_credential(self, at: Replica, task: Task) -> None:
        r = await at.admin_post(f"/v1/admin/credentials/{task.jti}/revoke", self.admin_token)
        assert r.status_code == 200, r.text
        assert r.json()["changed"] is True

    async def set_agent(self, at: Replica, verb: str) -> None:
        path = f"/v1/admin/agents/{quote(AGENT, safe='')}/{verb}"
        r = await at.admin_post(path, self.admin_token, json={"reason": f"replica test: {verb}"})
        assert r.status_code == 200, r.text
        assert r.json()["changed"] is True

    async def log_seq(self) -> int:
        """The highest sequence number in the revocation log (read through A)."""
        seq, after = 0, 0
        while True:
            r = await self.a.admin_get(
                "/v1/admin/revocations", self.admin_token, params={"after": after, "limit": 1000}
            )
            assert r.status_code == 200, r.text
            entries = r.json()["revocations"]
            if not entries:
                return seq
            seq = after = max(e["seq"] for e in entries)


def registry(echo_base: str) -> dict[str, Any]:
    return {
        "owners": [{"id": "alice", "contact": "alice@example.com"}],
        "tools": [
            {
                "id": "echo",
                "audience": f"{PUBLIC}/echo",
                "upstream_url": echo_base,
                "upstream_secret": "Bearer upstream-secret",
                "actions": [
                    {"name": "get", "tier": "read", "method": "GET", "path": "/items/{id}"}
                ],
            }
        ],
        "agents": [
            {"spiffe_id": AGENT, "owner": "alice", "ceiling": [{"tool": "echo", "tier": "read"}]}
        ],
    }


def replica_env(
    tmp: Path, name: str, port: int, url: str, kek: str, revocation: dict[str, Any]
) -> dict[str, str]:
    # Nothing of the caller's taskbound configuration leaks into the servers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBOUND_")}
    env.update(
        {
            "TASKBOUND_SERVER__PORT": str(port),
            "TASKBOUND_SERVER__PUBLIC_URL": PUBLIC,
            "TASKBOUND_SERVER__SWEEP_INTERVAL_SECONDS": "3600",
            "TASKBOUND_STORAGE__URL": url,
            "TASKBOUND_STORAGE__DATA_DIR": str(tmp / name),
            "TASKBOUND_KEYS__KEK": kek,
            "TASKBOUND_KEYS__GENERATE_KEK_IF_MISSING": "false",
            "TASKBOUND_IDENTITY__DEV_ISSUER": "true",
            "TASKBOUND_POLICY__WATCH": "false",
            "TASKBOUND_GATEWAY__LIVENESS_TTL_SECONDS": str(LIVENESS_TTL_S),
            "TASKBOUND_LOGGING__LEVEL": "info",
        }
    )
    for key, value in revocation.items():
        env[f"TASKBOUND_REVOCATION__{key.upper()}"] = str(value)
    return env


MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """``await make_cluster(b_revocation={...}, b_listen_via=proxy)``: replicas A and B up,
    the registry applied, an admin token made. Everything is stopped and dropped after."""
    base_url = postgres_url()  # skips, or fails under TASKBOUND_REQUIRE_SERVICES=1
    replicas: list[Replica] = []
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            *, b_revocation: dict[str, Any] | None = None, b_listen_via: TcpProxy | None = None
        ) -> Cluster:
            url = stack.enter_context(postgres_schema(base_url))
            echo = Echo(f"http://127.0.0.1:{free_port()}")
            server, task = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))

            async def stop_echo() -> None:
                server.should_exit = True
                await task

            stack.push_async_callback(stop_echo)
            kek = generate_kek()
            b_rev = dict(b_revocation or {})
            if b_listen_via is not None:
                b_rev["listen_url"] = via_proxy(url, b_listen_via)
            a = Replica("A", free_port(), {}, tmp_path / "a.log")
            a.env = replica_env(tmp_path, "a", a.port, url, kek, {})
            b = Replica("B", free_port(), {}, tmp_path / "b.log")
            b.env = replica_env(tmp_path, "b", b.port, url, kek, b_rev)
            replicas.extend([a, b])
            stack.push_async_callback(a.stop)
            stack.push_async_callback(b.stop)
            # A first: it migrates the fresh schema and makes the keys B then loads.
            a.start()
            await a.ready()
            storage = await open_storage(url)
            try:
                admin = (await create_admin_token(storage, SystemClock(), "replica tests")).token
            finally:
                await storage.close()
            applied = await a.admin_post("/v1/admin/apply", admin, json=registry(echo.base))
            assert applied.status_code == 200, applied.text
            b.start()
            await b.ready()
            return Cluster(a, b, echo, admin, url)

        try:
            yield make
        finally:
            # Shown by pytest only when the test failed.
            for replica in replicas:
                print(f"===== replica {replica.name} log =====\n{replica.logs()}")
