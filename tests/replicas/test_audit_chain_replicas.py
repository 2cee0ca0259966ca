"""The audit chain under what production does to it, with real `taskbound serve` processes
and a real upstream:

1. a server killed with SIGKILL in the middle of a burst of concurrent gateway calls (calls
   in flight, a checkpoint signed during the burst), on SQLite and on PostgreSQL, then
   restarted on the same database: the chain verifies, its sequence numbers have no gap,
   every call that was answered before the kill has exactly one ``gateway.call`` record,
   and the restarted server extends the same chain;
2. two replicas on one PostgreSQL serving calls at the same time (and signing checkpoints
   while they do) write ONE chain: it verifies at either replica and offline from the
   export, its numbers have no gap, every answered call is in it once, and the two
   replicas' records are interleaved in it (so they did write concurrently).

A call is told apart from every other by its path (``/echo/items/{key}``, each key used
once): its record's ``argument_digest`` is the digest of ``{"id": key}``. Bounded: 200
calls per burst, 32 at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskbound.core import audit
from taskbound.core.actions import argument_digest
from taskbound.core.clock import SystemClock
from taskbound.core.keys import KeyRing
from taskbound.core.secretbox import generate_kek
from taskbound.service.admin import create_admin_token
from taskbound.storage import open_storage
from tests.api.conftest import free_port
from tests.gateway.conftest import Echo, echo_app, serve
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

from .conftest import (
    AGENT,
    Agent,
    Cluster,
    MakeCluster,
    Replica,
    Task,
    registry,
    replica_env,
)

BURST = 200  # calls per burst (per replica)
CONCURRENCY = 32  # calls in flight at once (per replica)
KILL_AFTER = 80  # answered calls before the SIGKILL
CALL_TIMEOUT_S = 10.0


def path_of(key: str) -> str:
    return f"/echo/items/{key}"


def digest_of(key: str) -> str:
    """The argument digest the gateway records for a call to :func:`path_of` ``(key)``."""
    return argument_digest({"id": key})


@dataclass
class Burst:
    """What a burst of calls got: the status of each answered call by key, and the calls
    that got no answer (cut by the server's death)."""

    answered: dict[str, int] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)


async def burst(
    base: str,
    agent: Agent,
    task: Task,
    keys: list[str],
    *,
    answered: Callable[[int], None] = lambda _: None,
) -> Burst:
    """Call :func:`path_of` each key through the gateway at ``base``, CONCURRENCY at a time,
    until the keys run out; a worker whose call gets no answer (the server died) stops.
    ``answered`` is told the running count of answered calls."""
    out = Burst()
    pending = iter(keys)
    # Its own client: no connection of it outlives the burst, and a kill of the server does
    # not close it under the workers.
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=CALL_TIMEOUT_S, limits=limits) as http:

        async def worker() -> None:
            for key in pending:
                path = path_of(key)
                headers = {
                    "Authorization": f"DPoP {task.token}",
                    "DPoP": agent.proof("GET", path, task.token),
                }
                try:
                    r = await http.get(path, headers=headers)
                except httpx.TransportError:
                    out.cut.append(key)
                    return
                out.answered[key] = r.status_code
                answered(len(out.answered))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


async def until(event: asyncio.Event, running: asyncio.Task[Burst]) -> None:
    """Wait for ``event``; fail if the burst ended first."""
    waiter = asyncio.create_task(event.wait())
    await asyncio.wait({waiter, running}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        pytest.fail(f"the burst ended before the event: {running.result()}")


async def dev_agent(at: Replica, admin_token: str) -> Agent:
    body = {"spiffe_id": AGENT, "ttl_seconds": 600}
    r = await at.admin_post("/v1/admin/dev/identity", admin_token, json=body)
    assert r.status_code == 201, r.text
    return Agent(r.json()["token"])


# --- what the chain says -------------------------------------------------------------------


async def verified(at: Replica, admin_token: str) -> dict[str, Any]:
    """GET /v1/admin/audit/verify at ``at``; it must say ok."""
    r = await at.admin_get("/v1/admin/audit/verify", admin_token)
    assert r.status_code == 200, r.text
    report: dict[str, Any] = r.json()
    assert report["ok"] is True, report
    assert report["problem"] is None, report
    return report


@dataclass
class Exported:
    records: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]

    def calls(self, task: Task) -> dict[str, list[int]]:
        """The sequence numbers of the task's allowed gateway calls, by argument digest."""
        found: dict[str, list[int]] = {}
        for line in self.records:
            body = line["record"]
            if body["event"] == "gateway.call" and body["task"] == task.id:
                assert body["decision"] == "allow", body
                assert (body["tool"], body["action"], body["jti"]) == ("echo", "get", task.jti)
                assert body["upstream_status"] == 200, body
                found.setdefault(body["argument_digest"], []).append(line["seq"])
        return found


async def exported(at: Replica, admin_token: str) -> Exported:
    """The chain as GET /v1/admin/audit/export gives it, checked as an auditor would with
    nothing but the export and the published keys: numbers 1..n with no gap, each record
    linked to the one before, every checkpoint signed and on the chain."""
    r = await at.admin_get("/v1/admin/audit/export", admin_token, params={"format": "jsonl"})
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    records = [line for line in lines if line["type"] == "record"]
    checkpoints = [line for line in lines if line["type"] == "checkpoint"]
    assert [line["seq"] for line in records] == list(range(1, len(records) + 1))
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"], after["seq"]
    jwks = (await at.client.get("/.well-known/audit-jwks.json")).json()
    report = audit.verify(
        [audit.ChainRecord(x["seq"], x["prev"], x["hash"], x["record"]) for x in records],
        [c["jws"] for c in checkpoints],
        keys=KeyRing.from_jwks(jwks),
    )
    assert report.ok, report.problem
    assert report.records == len(records)
    assert report.checkpoints == len(checkpoints)
    return Exported(records, checkpoints)


# --- one server, killed and restarted --------------------------------------------------------


@dataclass
class Server:
    replica: Replica
    echo: Echo
    admin_token: str
    url: str


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    """One `taskbound serve` process on a fresh database (a SQLite file, or a new
    PostgreSQL schema), the registry applied, and an echo upstream."""
    replica: Replica | None = None
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(postgres_schema(postgres_url()))
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'taskbound.db'}"
        echo = Echo(f"http://127.0.0.1:{free_port()}")
        upstream, serving = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))

        async def stop_echo() -> None:
            upstream.should_exit = True
            await serving

        stack.push_async_callback(stop_echo)
        replica = Replica("S", free_port(), {}, tmp_path / "s.log")
        replica.env = replica_env(tmp_path, "s", replica.port, url, generate_kek(), {})
        stack.push_async_callback(replica.stop)
        replica.start()
        await replica.ready()
        storage = await open_storage(url)
        try:
            admin = (await create_admin_token(storage, SystemClock(), "audit chain tests")).token
        finally:
            await storage.close()
        applied = await replica.admin_post("/v1/admin/apply", admin, json=registry(echo.base))
        assert applied.status_code == 200, applied.text
        try:
            yield Server(replica, echo, admin, url)
        finally:
            # Shown by pytest only when the test failed.
            print(f"===== server log =====\n{replica.logs()}")


async def test_a_server_killed_mid_burst_leaves_a_chain_with_every_answered_call(
    server: Server,
) -> None:
    s, token = server.replica, server.admin_token
    agent = await dev_agent(s, token)
    task = await agent.start(s)
    keys = [f"kill-{i}" for i in range(BURST)]
    halfway, enough = asyncio.Event(), asyncio.Event()

    def answered(n: int) -> None:
        if n >= KILL_AFTER // 2:
            halfway.set()
        if n >= KILL_AFTER:
            enough.set()

    running = asyncio.create_task(burst(s.base, agent, task, keys, answered=answered))
    await until(halfway, running)
    # A checkpoint signed while calls are being appended: it must still match the chain.
    signed = await s.admin_post("/v1/admin/audit/checkpoints", token)
    assert signed.status_code in (200, 201), signed.text
    await until(enough, running)
    await s.kill()
    got = await running

    # The kill did cut the burst: calls were in flight, and some were never sent.
    assert got.cut, "no call was in flight at the kill"
    assert len(got.answered) < BURST
    assert set(got.answered.values()) == {200}, got.answered

    s.start()
    await s.ready()
    report = await verified(s, token)
    assert report["checkpoints"] >= 1
    chain = await exported(s, token)
    assert report["last_seq"] == len(chain.records)
    calls = chain.calls(task)
    missing = [k for k in got.answered if len(calls.get(digest_of(k), [])) != 1]
    assert missing == [], f"answered calls without exactly one record: {missing}"
    # A record may exist for a call whose answer was lost (it committed, then the process
    # died); none for a call never sent.
    recorded_cut = [k for k in got.cut if digest_of(k) in calls]
    unsent = set(keys) - set(got.answered) - set(got.cut)
    assert not any(digest_of(k) in calls for k in unsent)
    assert len(calls) == len(got.answered) + len(recorded_cut)
    print(
        f"answered {len(got.answered)}, cut in flight {len(got.cut)} (recorded anyway "
        f"{len(recorded_cut)}), chain {len(chain.records)} records"
    )

    # The restarted server extends the same chain.
    after = await burst(s.base, agent, task, ["after-restart"])
    assert after.answered == {"after-restart": 200}
    report = await verified(s, token)
    chain = await exported(s, token)
    assert chain.calls(task)[digest_of("after-restart")] == [len(chain.records)]
    assert report["last_seq"] == len(chain.records)


# --- two replicas, one chain -----------------------------------------------------------------


async def test_two_replicas_writing_at_once_make_one_gapless_chain(
    make_cluster: MakeCluster,
) -> None:
    c: Cluster = await make_cluster()
    agent = await c.agent()
    task = await agent.start(c.a)
    keys = {
        "A": [f"a-{i}" for i in range(BURST)],
        "B": [f"b-{i}" for i in range(BURST)],
    }
    going = asyncio.Event()

    async def checkpoints() -> int:
        """Both replicas sign checkpoints while the calls are appended."""
        await going.wait()
        signed = 0
        for _ in range(3):
            for at in (c.a, c.b):
                r = await at.admin_post("/v1/admin/audit/checkpoints", c.admin_token)
                assert r.status_code in (200, 201), r.text
                signed += 1
            await asyncio.sleep(0.05)
        return signed

    def answered(n: int) -> None:
        if n >= CONCURRENCY:
            going.set()

    got_a, got_b, _ = await asyncio.gather(
        burst(c.a.base, agent, task, keys["A"], answered=answered),
        burst(c.b.base, agent, task, keys["B"], answered=answered),
        checkpoints(),
    )
    for got in (got_a, got_b):
        assert got.cut == []
        assert len(got.answered) == BURST
        assert set(got.answered.values()) == {200}

    report = await verified(c.a, c.admin_token)
    assert report == await verified(c.b, c.admin_token)
    assert report["checkpoints"] >= 1
    chain = await exported(c.b, c.admin_token)
    assert report["last_seq"] == report["records"] == len(chain.records)
    calls = chain.calls(task)
    by_digest = {digest_of(k): name for name, ks in keys.items() for k in ks}
    assert sorted(calls) == sorted(by_digest), "a call without its record, or a stray one"
    assert all(len(seqs) == 1 for seqs in calls.values())

    # Whose record each one is, in chain order: the two replicas took turns.
    order = [by_digest[d] for d, _ in sorted(calls.items(), key=lambda item: item[1][0])]
    turns = 1 + sum(1 for x, y in itertools.pairwise(order) if x != y)
    print(f"{len(chain.records)} records, {turns} turns between the replicas")
    assert turns > 2, f"the replicas did not write concurrently: {''.join(order)}"
