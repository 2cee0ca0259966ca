"""A revocation made through one replica holds at every other (DESIGN.md §3 flow 7), with
two real server processes on one PostgreSQL database:

1. a task ended, an agent suspended (then resumed) and a single credential revoked through
   replica A are refused by replica B's gateway — which answered 200 just before — within
   a second, by NOTIFY (B's heartbeat is set far longer, and its cached liveness answers
   outlive the test, so nothing else could tell it that fast);
2. a replica killed, a revocation made while it is down, the replica restarted: its very
   first gateway answer refuses the revoked credential, and its feed has caught up;
3. a replica whose feed is cut refuses every call (503 ``revocation_feed_stale``) once its
   staleness bound has passed, and when the feed is restored it catches up — refusing what
   was revoked meanwhile — and serves again; the same for a silent partition (connections
   left open, nothing getting through), which only the replica's own timeouts can detect;
   and during such a partition a call through B is still answered within the bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.services import postgres_url

from .conftest import START_TIMEOUT_S, Agent, Cluster, MakeCluster, Replica, TcpProxy, code, first

# B follows the log by NOTIFY only, as far as a one-second wait can tell: its heartbeat
# catch-up comes every 10 s.
NOTIFY_ONLY = {"staleness_bound_seconds": 20, "heartbeat_seconds": 10}
PROPAGATION_S = 1.0
# A short bound for the cut-feed test.
BOUND_S, HEARTBEAT_S = 2.0, 0.5


def ok(r: httpx.Response) -> bool:
    return r.status_code == 200


def refused(r: httpx.Response) -> bool:
    return r.status_code == 401 and code(r) == "invalid_token"


def stale(r: httpx.Response) -> bool:
    return r.status_code == 503 and code(r) == "revocation_feed_stale"


async def refused_at(b: Replica, agent: Agent, token: str, what: str) -> float:
    """Call through ``b`` until the credential is refused; it must be answered 200 until
    then, and refused within PROPAGATION_S. Returns how long it took."""
    _, took, seen = await first(
        lambda: agent.call(b, token), refused, within=PROPAGATION_S, allowed=ok
    )
    print(f"{what}: refused at B after {took * 1000:.1f} ms ({len(seen)} calls)")
    assert took < PROPAGATION_S
    return took


async def caught_up(c: Cluster, b: Replica) -> None:
    feed = await b.feed(c.admin_token)
    assert feed["seq"] == await c.log_seq()
    assert feed["stale"] is False


# --- 1. propagation ------------------------------------------------------------------------


async def test_a_task_ended_through_a_is_refused_at_b(make_cluster: MakeCluster) -> None:
    c = await make_cluster(b_revocation=NOTIFY_ONLY)
    agent = await c.agent()
    ended, other = await agent.start(c.a), await agent.start(c.b)
    for at in (c.a, c.b):
        assert ok(await agent.call(at, ended.token))
        assert ok(await agent.call(at, other.token))

    await c.revoke_task(c.a, ended)
    await refused_at(c.b, agent, ended.token, "task ended through A")

    assert ok(await agent.call(c.b, other.token)), "only the ended task is refused"
    assert refused(await agent.call(c.a, ended.token))
    await caught_up(c, c.b)


async def test_an_agent_suspended_through_a_is_refused_at_b_until_resumed(
    make_cluster: MakeCluster,
) -> None:
    c = await make_cluster(b_revocation=NOTIFY_ONLY)
    agent = await c.agent()
    old = await agent.start(c.b)
    assert ok(await agent.call(c.b, old.token))

    await c.set_agent(c.a, "suspend")
    await refused_at(c.b, agent, old.token, "agent suspended through A")
    r = await agent.try_start(c.b)
    assert r.status_code in (401, 403), r.text

    await c.set_agent(c.a, "resume")
    new = await agent.start(c.b)
    _, took, _ = await first(
        lambda: agent.call(c.b, new.token), ok, within=PROPAGATION_S, allowed=refused
    )
    print(f"agent resumed through A: a new task served at B after {took * 1000:.1f} ms")
    # Resuming an agent does not bring its revoked tasks back.
    for at in (c.b, c.a):
        assert refused(await agent.call(at, old.token))
    await caught_up(c, c.b)


async def test_a_credential_revoked_through_a_is_refused_at_b(make_cluster: MakeCluster) -> None:
    c = await make_cluster(b_revocation=NOTIFY_ONLY)
    agent = await c.agent()
    task = await agent.start(c.b)
    sibling = await agent.fresh_credential(c.b, task)
    assert ok(await agent.call(c.b, task.token))
    assert ok(await agent.call(c.b, sibling.token))

    await c.revoke_credential(c.a, task)
    await refused_at(c.b, agent, task.token, "credential revoked through A")

    assert ok(await agent.call(c.b, sibling.token)), "the task and its other credential live on"
    await caught_up(c, c.b)


# --- 2. restart ----------------------------------------------------------------------------


async def test_a_restarted_replica_refuses_what_was_revoked_while_it_was_down(
    make_cluster: MakeCluster,
) -> None:
    c = await make_cluster(b_revocation=NOTIFY_ONLY)
    agent = await c.agent()
    doomed, kept = await agent.start(c.b), await agent.start(c.b)
    assert ok(await agent.call(c.b, doomed.token))
    assert ok(await agent.call(c.b, kept.token))

    await c.b.kill()
    await c.revoke_task(c.a, doomed)
    seq = await c.log_seq()
    c.b.start()

    # The very first answer B gives at all is a gateway answer for the revoked credential.
    started = time.monotonic()
    while True:
        assert c.b.exited() is None, f"B exited:\n{c.b.logs()}"
        assert time.monotonic() - started < START_TIMEOUT_S, "B did not come back"
        try:
            first_answer = await agent.call(c.b, doomed.token)
            break
        except httpx.TransportError:
            await asyncio.sleep(0.02)
    print(f"B answered {time.monotonic() - started:.2f} s after restart")
    assert refused(first_answer), first_answer.text
    feed = await c.b.feed(c.admin_token)
    assert feed["seq"] >= seq
    assert feed["stale"] is False
    assert ok(await agent.call(c.b, kept.token))

    # And it follows the log again.
    await c.revoke_task(c.a, kept)
    await refused_at(c.b, agent, kept.token, "task ended through A after B's restart")
    await caught_up(c, c.b)


# --- 3. a cut feed -------------------------------------------------------------------------


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    """A cuttable TCP proxy in front of the test PostgreSQL server."""
    url = make_url(postgres_url())
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.restore()
    try:
        yield proxy
    finally:
        await proxy.cut()


async def test_a_cut_feed_fails_closed_and_recovers(
    pg_proxy: TcpProxy, make_cluster: MakeCluster
) -> None:
    c = await make_cluster(
        b_revocation={"staleness_bound_seconds": BOUND_S, "heartbeat_seconds": HEARTBEAT_S},
        b_listen_via=pg_proxy,
    )
    assert pg_proxy.connections >= 1, "B listens through the proxy"
    agent = await c.agent()
    live, doomed = await agent.start(c.a), await agent.start(c.a)
    assert ok(await agent.call(c.b, live.token))
    assert ok(await agent.call(c.b, doomed.token))
    assert await c.b.metric("taskbound_revocation_feed_stale") == 0

    await pg_proxy.cut()
    cut_at = time.monotonic()
    assert ok(await agent.call(c.b, live.token)), "within the bound, a cut feed still serves"
    await first(
        lambda: agent.call(c.b, live.token), stale, within=BOUND_S + 2, every=0.1, allowed=ok
    )
    stale_after = time.monotonic() - cut_at
    print(f"feed cut: B refuses with 503 after {stale_after:.2f} s (bound {BOUND_S} s)")
    assert BOUND_S - HEARTBEAT_S - 0.2 <= stale_after <= BOUND_S + 1.0
    assert await c.b.metric("taskbound_revocation_feed_stale") == 1
    assert (await c.b.feed(c.admin_token))["stale"] is True

    await c.revoke_task(c.a, doomed)
    assert stale(await agent.call(c.b, doomed.token))
    assert refused(await agent.call(c.a, doomed.token))

    await pg_proxy.restore()
    restored_at = time.monotonic()
    await first(lambda: agent.call(c.b, live.token), ok, within=10, every=0.1, allowed=stale)
    print(f"feed restored: B serves again after {time.monotonic() - restored_at:.2f} s")
    # Serving again means caught up: what was revoked while cut is refused at once.
    assert refused(await agent.call(c.b, doomed.token))
    assert await c.b.metric("taskbound_revocation_feed_stale") == 0
    assert await c.b.metric("taskbound_revocation_feed_failures_total") >= 1
    await caught_up(c, c.b)


async def test_a_silent_partition_fails_closed_and_recovers(
    pg_proxy: TcpProxy, make_cluster: MakeCluster
) -> None:
    """As above, but nothing is closed: B's listening connection stays open and silent (a
    network partition, not a refusal), so only B's own timeouts can tell."""
    c = await make_cluster(
        b_revocation={"staleness_bound_seconds": BOUND_S, "heartbeat_seconds": HEARTBEAT_S},
        b_listen_via=pg_proxy,
    )
    agent = await c.agent()
    live, doomed = await agent.start(c.a), await agent.start(c.a)
    assert ok(await agent.call(c.b, live.token))
    assert ok(await agent.call(c.b, doomed.token))

    pg_proxy.pause()
    paused_at = time.monotonic()
    await first(
        lambda: agent.call(c.b, live.token), stale, within=BOUND_S + 2, every=0.1, allowed=ok
    )
    stale_after = time.monotonic() - paused_at
    print(f"feed partitioned: B refuses with 503 after {stale_after:.2f} s (bound {BOUND_S} s)")
    assert stale_after <= BOUND_S + 1.0
    await c.revoke_task(c.a, doomed)

    pg_proxy.resume()
    resumed_at = time.monotonic()
    await first(lambda: agent.call(c.b, live.token), ok, within=15, every=0.1, allowed=stale)
    print(f"partition healed: B serves again after {time.monotonic() - resumed_at:.2f} s")
    assert refused(await agent.call(c.b, doomed.token))
    await caught_up(c, c.b)


async def test_a_call_after_a_local_revocation_is_answered_during_a_silent_partition(
    pg_proxy: TcpProxy, make_cluster: MakeCluster
) -> None:
    """A revocation made through B marks B's feed behind, so B's next gateway call first
    catches up (``RevocationFeed.sync``). While B's listening connection is silently
    partitioned, that call must still be answered — served from the store, or refused 503
    once the bound has passed — within the staleness bound, not held until the blocked
    catch-up gives up."""
    c = await make_cluster(
        b_revocation={"staleness_bound_seconds": BOUND_S, "heartbeat_seconds": HEARTBEAT_S},
        b_listen_via=pg_proxy,
    )
    agent = await c.agent()
    live, local = await agent.start(c.a), await agent.start(c.a)
    assert ok(await agent.call(c.b, live.token))

    pg_proxy.pause()
    try:
        # By now B's feed has finished waiting for a notification and is catching up over
        # the partitioned connection.
        await asyncio.sleep(HEARTBEAT_S + 0.2)
        await c.revoke_task(c.b, local)
        started = time.monotonic()
        try:
            r = await agent.call(c.b, live.token, answer_within=BOUND_S + 1)
        except httpx.ReadTimeout:
            pytest.fail(
                f"B held a gateway call for more than {BOUND_S + 1} s (staleness bound "
                f"{BOUND_S} s) after a revocation made through B, while its feed was "
                "partitioned: RevocationFeed.sync() waits for the lock that the blocked "
                "catch-up holds (see the report)"
            )
        took = time.monotonic() - started
        print(f"call after a local revocation, feed partitioned: {r.status_code} in {took:.2f} s")
        assert ok(r) or stale(r), r.text
        r = await agent.call(c.b, local.token, answer_within=BOUND_S + 1)
        assert refused(r) or stale(r), r.text
    finally:
        pg_proxy.resume()
