"""Benchmark: the revocation feed.

In one run:
1. propagation between two replicas over real PostgreSQL: this process (replica A) makes N
   revocations one after another through a SqlStorage on a fresh schema — ending a task or
   revoking a credential, alternately — and notes time.monotonic() as each commit returns;
   a second process (replica B) runs a RevocationFeed on a PostgresListener and notes
   time.monotonic() as each entry is applied. CLOCK_MONOTONIC is system-wide on Linux, so
   the difference is the propagation latency. Raw limit, in the same run and the same
   pacing: a bare pg_notify from one psycopg connection to a LISTENing one in another
   process;
2. memory per million live revocations: a RevocationState of 1,000,000 credential entries
   (expiries spread over 10 minutes), by tracemalloc and by RSS, each in a fresh process,
   against the raw limit of a plain set of the same jti strings; and the cost of apply()
   and refusal() per entry against set.add and a bare set lookup.

Needs PostgreSQL for part 1 (--postgres, default $TASKBOUND_TEST_POSTGRES_URL); part 2
runs anywhere. Bounded in revocations, entries and time.

    .venv/bin/python bench/revocation.py [--revocations 1000] [--entries 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from taskbound.config import load_settings
from taskbound.core.clock import SystemClock
from taskbound.core.model import (
    Agent,
    AgentState,
    CredentialRecord,
    Owner,
    Revocation,
    RevocationKind,
    Role,
    Scope,
    ScopeGrant,
    Task,
    TaskState,
    Tier,
)
from taskbound.core.revocation import RevocationState, Standing
from taskbound.storage import SqlStorage, open_storage

AGENT = "spiffe://taskbound.local/agents/bench"
GOAL_P99_MS = 100.0
CHILD_TIMEOUT_S = 60.0
SPREAD = timedelta(minutes=10)


def pct(values: list[float], p: int) -> float:
    """The p-th percentile of ``values`` (seconds), in ms."""
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_schema(url: str, schema: str) -> str:
    return (
        make_url(url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


# --- replica B: a child process ------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    """This script as a child; it says ``ready`` on stdout, then waits for a line on stdin."""
    child = subprocess.Popen(  # noqa: S603 (this script, with our own arguments)
        [sys.executable, os.path.abspath(__file__), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise RuntimeError(f"child {args[:2]} did not start: {line!r}")
    return child


def finish(child: subprocess.Popen[str], line: str) -> Any:
    """Tell the child ``line``; its JSON answer."""
    try:
        out, _ = child.communicate(line + "\n", timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise RuntimeError("child did not answer in time") from None
    if child.returncode != 0:
        raise RuntimeError(f"child failed ({child.returncode})")
    return json.loads(out)


async def child_feed(url: str) -> None:
    """Replica B: a RevocationFeed on a PostgresListener; when told ``<seq>`` on stdin, wait
    until that entry is applied and print {seq: monotonic time it was applied}."""
    from taskbound.service.revocations import RevocationFeed
    from taskbound.storage.pg_listen import PostgresListener

    settings = load_settings(environ={}, overrides={"storage": {"url": url}})
    storage = SqlStorage.from_url(url)
    feed = RevocationFeed(settings, storage, SystemClock(), source=PostgresListener(url))
    applied: dict[int, float] = {}
    last = float("inf")
    done = asyncio.Event()

    def note(entries: list[Revocation]) -> None:
        now = time.monotonic()
        for entry in entries:
            applied[entry.seq] = now
        if feed.state.seq >= last:
            done.set()

    feed.listeners.append(note)
    await feed.load()
    feed.start()
    print("ready", flush=True)
    last = int(await asyncio.to_thread(sys.stdin.readline))
    if feed.state.seq < last:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), CHILD_TIMEOUT_S)
    await feed.aclose()
    await storage.close()
    print(json.dumps({"applied": applied, "failures": feed.failures}), flush=True)


def child_raw(url: str, channel: str) -> None:
    """The raw limit's listener: a plain psycopg connection LISTENing; prints {payload:
    monotonic time received} once the payload ``stop`` arrives."""
    received: dict[str, float] = {}
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        print("ready", flush=True)
        for n in conn.notifies(timeout=CHILD_TIMEOUT_S):
            if n.payload == "stop":
                break
            received[n.payload] = time.monotonic()
    sys.stdin.readline()
    print(json.dumps(received), flush=True)


# --- replica A: this process ---------------------------------------------------------------


def raw_round_trips(url: str, n: int) -> list[float]:
    """Seconds from sending each bare pg_notify to its arrival at the other process."""
    # Channels are per database, not per schema: one of our own.
    channel = f"bench_raw_{secrets.token_hex(6)}"
    child = spawn("--child", "raw", "--postgres", url, "--channel", channel)
    sent: list[float] = []
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        for i in range(n):
            sent.append(time.monotonic())
            conn.execute("SELECT pg_notify(%s, %s)", (channel, str(i)))
        conn.execute("SELECT pg_notify(%s, 'stop')", (channel,))
    received = finish(child, "done")
    missing = n - len(received)
    if missing:
        print(f"  (raw: {missing} notifications not received)")
    return [received[str(i)] - sent[i] for i in range(n) if str(i) in received]


async def prepare(storage: SqlStorage, n: int) -> list[Task]:
    """An owner, an agent and ``n`` live tasks with one credential each."""
    now = datetime.now(UTC)
    await storage.create_owner(
        Owner("alice", "a@example.com", frozenset({Role.APPROVER}), now, now)
    )
    await storage.create_agent(
        Agent(AGENT, "alice", AgentState.ACTIVE, frozenset({Scope("echo", Tier.READ)}), now, now)
    )
    tasks = []
    for i in range(n):
        task = Task(
            id=f"task_{i}_{secrets.token_hex(4)}",
            agent_id=AGENT,
            owner_id="alice",
            purpose="bench",
            constraints={},
            granted=(ScopeGrant("echo", Tier.READ, ("get",)),),
            denied=(),
            jkt="jkt",
            created_at=now,
            expires_at=now + timedelta(hours=1),
        )
        cred = CredentialRecord(
            jti=f"cred_{task.id}",
            task_id=task.id,
            agent_id=AGENT,
            tool="echo",
            tier=Tier.READ,
            actions=("get",),
            jkt="jkt",
            kid="kid-1",
            issued_at=now,
            expires_at=now + timedelta(minutes=10),
        )
        assert await storage.create_task(task, [cred])
        tasks.append(task)
    return tasks


@dataclass
class Propagation:
    sent: list[float]  # seconds from asking the store to revoke to applied at B
    committed: list[float]  # seconds from the commit's return to applied at B
    failures: int  # times B's feed failed and reconnected


async def feed_propagation(url: str, n: int) -> Propagation:
    """Seconds from each revocation (here) to its application at replica B."""
    storage = await open_storage(url)
    assert isinstance(storage, SqlStorage)
    try:
        tasks = await prepare(storage, n)
        child = spawn("--child", "feed", "--postgres", url)
        sent: dict[str, float] = {}
        committed: dict[str, float] = {}
        for i, task in enumerate(tasks):
            now = datetime.now(UTC)
            started = time.monotonic()
            if i % 2 == 0:
                ended = await storage.end_task(task.id, TaskState.REVOKED, "bench", now, cause="b")
                assert ended is not None
                assert ended[1]
                subject = task.id
            else:
                subject = f"cred_{task.id}"
                assert await storage.revoke_credential(subject, "bench", now, cause="b")
            committed[subject] = time.monotonic()
            sent[subject] = started
        seqs: dict[str, int] = {}
        after = 0
        while page := await storage.list_revocations(after=after, limit=1000):
            seqs.update((e.subject, e.seq) for e in page)
            after = page[-1].seq
        answer = finish(child, str(after))
    finally:
        await storage.close()
    applied = {int(k): v for k, v in answer["applied"].items()}
    missing = [s for s in committed if seqs[s] not in applied]
    if missing:
        print(f"  ({len(missing)} revocations never applied at B)")
    return Propagation(
        [applied[seqs[s]] - t for s, t in sent.items() if seqs[s] in applied],
        [applied[seqs[s]] - t for s, t in committed.items() if seqs[s] in applied],
        int(answer["failures"]),
    )


def propagation(base_url: str, n: int) -> None:
    schema = f"tb_bench_{secrets.token_hex(6)}"
    with psycopg.connect(conninfo(base_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        url = with_schema(base_url, schema)
        raw = raw_round_trips(url, n)
        feed = asyncio.run(feed_propagation(url, n))
    finally:
        with psycopg.connect(conninfo(base_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))

    def row(name: str, values: list[float], vs_raw: bool = True) -> str:
        ratio = ""
        if vs_raw:
            ratio = f"  ratio to raw p50 {pct(values, 50) / pct(raw, 50):5.1f}x"
            ratio += f" p99 {pct(values, 99) / pct(raw, 99):5.1f}x"
        return (
            f"  {name:34} p50 {pct(values, 50):7.2f} ms  p99 {pct(values, 99):7.2f} ms"
            f"  max {max(values) * 1000:7.2f} ms{ratio}"
        )

    print(
        f"propagation replica A -> replica B over PostgreSQL, {n} revocations one after "
        "another (end_task / revoke_credential alternately)"
    )
    print(row("raw: pg_notify sent -> received", raw, vs_raw=False))
    print(row("feed: revocation sent -> applied", feed.sent))
    print(row("feed: commit returned -> applied", feed.committed))
    if feed.failures:
        print(f"  (the feed at B failed and reconnected {feed.failures} times)")
    p99 = pct(feed.committed, 99)
    met = "met" if p99 < GOAL_P99_MS else "NOT MET"
    print(f"  goal: commit -> applied p99 under {GOAL_P99_MS:.0f} ms: {met} ({p99:.2f} ms)")


# --- memory and per-entry cost -------------------------------------------------------------


def jti() -> str:
    return "cred_" + secrets.token_urlsafe(16)


def credential_entry(seq: int, now: datetime) -> Revocation:
    return Revocation(
        kind=RevocationKind.CREDENTIAL,
        subject=jti(),
        time=now,
        cause="bench",
        reason="bench",
        expires_at=now + SPREAD * random.random(),
        agent_id=AGENT,
        task_id="task",
        seq=seq,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_memory(kind: str, how: str, n: int) -> None:
    """Build ``kind`` (state | set) of ``n`` entries in this fresh process; print the bytes
    it holds, by ``how`` (tracemalloc | rss)."""
    print("ready", flush=True)
    now = datetime.now(UTC)
    gc.collect()
    if how == "tracemalloc":
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if how == "tracemalloc" else rss_bytes()
    held: Any
    if kind == "state":
        held = RevocationState()
        for i in range(n):
            held.apply(credential_entry(i + 1, now))
    else:
        held = {jti() for _ in range(n)}
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if how == "tracemalloc" else rss_bytes()
    assert len(held) == n
    sys.stdin.readline()
    print(json.dumps({"bytes": after - before}), flush=True)


def per_entry(n: int) -> dict[str, float]:
    """Seconds per call: apply() and refusal() of a live credential against set.add and
    a set lookup of jti strings."""
    now = datetime.now(UTC)
    entries = [credential_entry(i + 1, now) for i in range(n)]
    jtis = [e.subject for e in entries]
    state, bare = RevocationState(), set[str]()
    t0 = time.perf_counter()
    for e in entries:
        state.apply(e)
    apply = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in jtis:
        bare.add(j)
    add = time.perf_counter() - t0
    live = [Standing(jti(), "task_live", AGENT, "alice", "kid-1") for _ in range(n)]
    probes = [s.jti for s in live]
    t0 = time.perf_counter()
    for s in live:
        state.refusal(s)
    refusal = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in probes:
        j in bare  # noqa: B015 (the lookup is what is measured)
    lookup = time.perf_counter() - t0
    assert all(state.refusal(Standing(j, "t", AGENT, "alice", "k")) for j in jtis[:100])
    return {"apply": apply / n, "add": add / n, "refusal": refusal / n, "lookup": lookup / n}


def memory(n: int, timed: int) -> None:
    found: dict[tuple[str, str], int] = {}
    for kind in ("state", "set"):
        for how in ("tracemalloc", "rss"):
            child = spawn("--child", "memory", "--kind", kind, "--how", how, "--entries", str(n))
            found[kind, how] = int(finish(child, "done")["bytes"])
    per_million = 1_000_000 / n / 2**20

    def mb(kind: str, how: str) -> float:
        return found[kind, how] * per_million

    print(f"memory of {n:,} live credential revocations (each in a fresh process)")
    print(f"  {'':34} {'tracemalloc':>12} {'RSS delta':>12}   MB per million")
    for kind, name in (("state", "RevocationState"), ("set", "raw: set of jti strings")):
        print(f"  {name:34} {mb(kind, 'tracemalloc'):9.1f} MB {mb(kind, 'rss'):9.1f} MB")
    ratio = found["state", "tracemalloc"] / found["set", "tracemalloc"]
    print(f"  ratio state / set (tracemalloc)    {ratio:7.2f}x")
    print(f"  bytes per entry (tracemalloc)      {found['state', 'tracemalloc'] / n:7.1f}")

    cost = per_entry(timed)
    print(f"per-entry cost, {timed:,} entries")
    print(
        f"  apply()             {cost['apply'] * 1e6:6.3f} us   raw set.add(jti)    "
        f"{cost['add'] * 1e6:6.3f} us   ratio {cost['apply'] / cost['add']:6.1f}x"
    )
    print(
        f"  refusal() live      {cost['refusal'] * 1e6:6.3f} us   raw jti in set      "
        f"{cost['lookup'] * 1e6:6.3f} us   ratio {cost['refusal'] / cost['lookup']:6.1f}x"
    )


def main() -> None:
    logging.getLogger("taskbound").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--revocations", type=int, default=1000, help="revocations to propagate (bounded)"
    )
    parser.add_argument(
        "--entries", type=int, default=1_000_000, help="revocations held in memory (bounded)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 100 revocations, 100k entries"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TASKBOUND_TEST_POSTGRES_URL"),
        help="PostgreSQL URL (postgresql+psycopg://…); default $TASKBOUND_TEST_POSTGRES_URL",
    )
    parser.add_argument("--child", choices=("feed", "raw", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("state", "set"), help=argparse.SUPPRESS)
    parser.add_argument("--how", choices=("tracemalloc", "rss"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    revocations = max(100, min(args.revocations, 20_000))
    entries = max(10_000, min(args.entries, 5_000_000))
    if args.quick:
        revocations, entries = 100, 100_000

    if args.child == "feed":
        asyncio.run(child_feed(args.postgres))
        return
    if args.child == "raw":
        child_raw(args.postgres, args.channel)
        return
    if args.child == "memory":
        child_memory(args.kind, args.how, entries)
        return

    if args.postgres:
        propagation(args.postgres, revocations)
    else:
        print("propagation: skipped (no PostgreSQL: pass --postgres or set the environment)")
    memory(entries, min(entries, 200_000))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="EdDSA is deprecated")
    main()
