"""The revocation feed (service/revocations.py) over the memory store and SQLite: loading
what still matters, confirming on every heartbeat, going stale without confirmations and
recovering with backoff, catching up after local revocations, telling its listeners, and
reloading the keyring when a key is withdrawn elsewhere.

Time is a fake monotonic clock (the feed's ``monotonic=``) for staleness, and a
:class:`FakeClock` for expiry; the loop's own waits are real but short (a 50 ms heartbeat).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from taskbound.config import Settings, load_settings
from taskbound.core.clock import FakeClock
from taskbound.core.model import (
    AgentState,
    KeyPurpose,
    KeyState,
    Revocation,
    RevocationKind,
    TaskState,
)
from taskbound.core.revocation import Standing
from taskbound.core.secretbox import generate_kek
from taskbound.errors import StorageError
from taskbound.service.keys import KeyManager
from taskbound.service.revocations import PAGE, PollingSource, RevocationFeed
from taskbound.service.runtime import open_services
from taskbound.storage import Storage, open_storage
from tests.storage.test_conformance import (
    AGENT,
    make_agent,
    make_credential,
    make_owner,
    make_task,
)

BOUND = 0.5  # the smallest staleness bound the configuration allows
HEARTBEAT = 0.05
WAIT_S = 5.0
# credentials.clock_leeway_seconds by default
LEEWAY = timedelta(seconds=30)


class Monotonic:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakySource:
    """A feed source that can be broken and healed: it stands for a lost database (the
    replica tests lose a real one). Healthy, it is the real :class:`PollingSource`."""

    def __init__(self, storage: Storage) -> None:
        self._real = PollingSource(storage)
        self.broken = False
        self.attempts: list[float] = []  # real monotonic times of failed fetches and opens
        self.opens = 0

    def _fail(self) -> None:
        self.attempts.append(time.monotonic())
        raise StorageError(internal="connection refused (test double)")

    async def open(self) -> None:
        self.opens += 1
        if self.broken:
            self._fail()
        await self._real.open()

    async def fetch(
        self, *, after: int, limit: int, live_at: datetime | None = None
    ) -> list[Revocation]:
        if self.broken:
            self._fail()
        return await self._real.fetch(after=after, limit=limit, live_at=live_at)

    async def wait(self, seconds: float) -> bool:
        return await self._real.wait(seconds)

    async def close(self) -> None:
        await self._real.close()


def make_settings(url: str, **revocation: float) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "storage": {"url": url},
            "keys": {"kek": generate_kek()},
            "revocation": {
                "staleness_bound_seconds": BOUND,
                "heartbeat_seconds": HEARTBEAT,
                **revocation,
            },
        },
    )


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return f"sqlite+aiosqlite:///{tmp_path / 'feed.db'}"


@pytest.fixture
async def storage(url: str, clock: FakeClock) -> AsyncIterator[Storage]:
    store = await open_storage(url)
    await store.create_owner(make_owner(clock.now()))
    await store.create_agent(make_agent(clock.now()))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def monotonic() -> Monotonic:
    return Monotonic()


@pytest.fixture
async def feeds(
    url: str, storage: Storage, clock: FakeClock, monotonic: Monotonic
) -> AsyncIterator[Callable[..., RevocationFeed]]:
    """Make feeds on ``storage``; every one made is closed at the end."""
    made: list[RevocationFeed] = []

    def make(source: FlakySource | None = None, **revocation: float) -> RevocationFeed:
        feed = RevocationFeed(
            make_settings(url, **revocation), storage, clock, source=source, monotonic=monotonic
        )
        made.append(feed)
        return feed

    try:
        yield make
    finally:
        for feed in made:
            await feed.aclose()


def standing(jti: str = "-", task_id: str = "-", agent_id: str = "-", kid: str = "-") -> Standing:
    return Standing(jti, task_id, agent_id, "alice", kid)


async def new_task(storage: Storage, clock: FakeClock, task_id: str, *jtis: str, ttl: int = 600):
    task = make_task(clock.now(), task_id, ttl=ttl)
    await storage.create_task(
        task, [make_credential(task, jti, clock.now(), ttl=min(ttl, 300)) for jti in jtis]
    )
    return task


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.01)


# --- load ----------------------------------------------------------------------------------


async def test_load_applies_the_entries_that_still_matter(
    storage: Storage, clock: FakeClock, feeds: Callable[..., RevocationFeed]
) -> None:
    # An entry that stopped mattering: a credential revoked and expired since (past the
    # clock leeway, 30 s by default).
    await new_task(storage, clock, "old", "short", ttl=600)
    short_task = make_task(clock.now(), "brief", ttl=20)
    await storage.create_task(
        short_task, [make_credential(short_task, "brief-1", clock.now(), ttl=10)]
    )
    assert await storage.revoke_credential("brief-1", "leaked", clock.advance(1))
    # Entries that still matter: a revoked credential, an ended task, a suspended agent.
    assert await storage.revoke_credential("short", "leaked", clock.advance(1))
    await new_task(storage, clock, "ended", "e1")
    await storage.end_task("ended", TaskState.REVOKED, "stop", clock.advance(1))
    await storage.set_agent_state(AGENT, AgentState.SUSPENDED, clock.advance(1))
    logged = await storage.list_revocations()
    assert len(logged) >= 4

    now = clock.advance(60)  # brief-1 and its task expired 10 and 20 s after their start
    feed = feeds()
    assert feed.stale() == float("inf")  # never loaded: refuse everything
    await feed.load()
    assert feed.stale() is None
    state = feed.state
    # Skipped: they expired by themselves, longer ago than the clock leeway (30 s).
    assert state.refusal(standing(jti="brief-1")) is None
    assert state.refusal(standing(task_id="brief")) is None
    assert state.refusal(standing(jti="short")) == "credential revoked"
    assert state.refusal(standing(task_id="ended")) == "task ended"
    assert state.refusal(standing(agent_id=AGENT)) == "agent suspended"
    # The agent's suspension ended its live tasks, "brief" among them.
    assert state.refusal(standing(task_id="old")) == "task ended"
    skipped = [e for e in logged if e.expires_at is not None and e.expires_at <= now - LEEWAY]
    assert {e.subject for e in skipped} == {"brief-1", "brief"}
    assert feed.applied == len(logged) - 2
    # seq is the highest entry *applied*: a skipped entry at the end of the log is read
    # again (and held until pruned) by the next catch-up, which moves seq to the log's end.
    assert state.seq == max(e.seq for e in logged if e not in skipped)
    await feed.sync()
    assert state.seq == logged[-1].seq
    assert state.refusal(standing(jti="short")) == "credential revoked"


async def test_load_and_sync_page_through_a_long_log(
    storage: Storage, clock: FakeClock, feeds: Callable[..., RevocationFeed]
) -> None:
    task = make_task(clock.now(), "big")
    root = make_credential(task, "root", clock.now())
    children = [
        make_credential(task, f"c-{i:04d}", clock.now(), parent_jti="root") for i in range(PAGE)
    ]
    await storage.create_task(task, [root, *children])
    assert await storage.revoke_credential("root", "leaked", clock.advance(1))
    feed = feeds()
    await feed.load()
    assert feed.applied == PAGE + 1
    assert feed.state.seq == PAGE + 1
    assert feed.state.refusal(standing(jti=f"c-{PAGE - 1:04d}")) == "credential revoked"

    # sync pages too.
    task = make_task(clock.now(), "bigger")
    root = make_credential(task, "root-2", clock.now())
    children = [
        make_credential(task, f"d-{i:04d}", clock.now(), parent_jti="root-2")
        for i in range(PAGE + 1)
    ]
    await storage.create_task(task, [root, *children])
    assert await storage.revoke_credential("root-2", "leaked", clock.advance(1))
    await feed.sync()
    assert feed.applied == 2 * PAGE + 3
    assert feed.state.seq == await storage.last_revocation_seq() == 2 * PAGE + 3
    assert feed.state.refusal(standing(jti=f"d-{PAGE:04d}")) == "credential revoked"


async def test_a_failed_load_leaves_the_feed_stale(
    storage: Storage, clock: FakeClock, feeds: Callable[..., RevocationFeed]
) -> None:
    source = FlakySource(storage)
    source.broken = True
    feed = feeds(source)
    with pytest.raises(StorageError):
        await feed.load()
    assert feed.stale() == float("inf")
    assert feed.age() is None


# --- staleness -----------------------------------------------------------------------------


async def test_stale_after_the_bound_without_confirmation(
    storage: Storage, monotonic: Monotonic, feeds: Callable[..., RevocationFeed]
) -> None:
    feed = feeds()
    await feed.load()
    assert feed.age() == 0.0
    assert feed.stale() is None
    monotonic.advance(BOUND)  # at the bound, exactly: still fresh
    assert feed.stale() is None
    monotonic.advance(0.01)
    age = feed.stale()
    assert age == pytest.approx(BOUND + 0.01)
    assert feed.age() == pytest.approx(BOUND + 0.01)
    # Catching up from this process does not confirm the feed: only its own source can.
    await feed.sync()
    assert feed.stale() is not None
    # Loading again does.
    await feed.load()
    assert feed.stale() is None


async def test_the_loop_confirms_on_every_heartbeat(
    storage: Storage, clock: FakeClock, monotonic: Monotonic, feeds: Callable[..., RevocationFeed]
) -> None:
    feed = feeds()
    await feed.load()
    feed.start()
    for _ in range(3):
        monotonic.advance(10 * BOUND)
        assert feed.stale() is not None
        # No revocation happens: the heartbeat alone confirms the feed again.
        await eventually(lambda: feed.stale() is None, "the heartbeat confirms the feed")
    # Entries written by someone else are picked up by the loop without a sync.
    await new_task(storage, clock, "t1", "c1")
    await storage.revoke_credential("c1", "leaked", clock.advance(1))
    await eventually(
        lambda: feed.state.refusal(standing(jti="c1")) is not None, "the loop applies new entries"
    )
    assert feed.failures == 0


async def test_a_lost_source_makes_the_feed_stale_and_it_recovers_with_backoff(
    storage: Storage, clock: FakeClock, monotonic: Monotonic, feeds: Callable[..., RevocationFeed]
) -> None:
    source = FlakySource(storage)
    feed = feeds(source)
    await feed.load()
    feed.start()
    await eventually(lambda: source.opens >= 1, "the loop runs")

    source.broken = True
    broke = time.monotonic()
    await eventually(lambda: feed.failures >= 4, "the loop retries")
    monotonic.advance(10 * BOUND)
    assert feed.stale() is not None  # no confirmation while the source is lost
    # A revocation made meanwhile: the loop cannot see it.
    await new_task(storage, clock, "t1", "c1")
    await storage.revoke_credential("c1", "leaked", clock.advance(1))
    await asyncio.sleep(3 * HEARTBEAT)
    assert feed.state.refusal(standing(jti="c1")) is None
    assert feed.stale() is not None

    # Backoff: retries come further and further apart (0.1 s, 0.2 s, 0.4 s … up to 5 s),
    # not at every heartbeat.
    attempts = list(source.attempts)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) >= 3
    assert all(later > earlier * 1.5 for earlier, later in itertools.pairwise(gaps))
    assert len(attempts) < (time.monotonic() - broke) / HEARTBEAT / 2

    source.broken = False
    await eventually(lambda: feed.stale() is None, "the feed recovers")
    assert feed.state.refusal(standing(jti="c1")) == "credential revoked"
    failures = feed.failures
    await asyncio.sleep(3 * HEARTBEAT)
    assert feed.failures == failures


async def test_the_loop_loads_a_feed_that_never_loaded(
    storage: Storage, clock: FakeClock, feeds: Callable[..., RevocationFeed]
) -> None:
    await new_task(storage, clock, "t1", "c1")
    await storage.revoke_credential("c1", "leaked", clock.advance(1))
    source = FlakySource(storage)
    source.broken = True
    feed = feeds(source)
    feed.start()
    await eventually(lambda: feed.failures >= 2, "the loop retries")
    assert feed.stale() == float("inf")
    source.broken = False
    await eventually(lambda: feed.stale() is None, "the loop loads the feed")
    assert feed.state.refusal(standing(jti="c1")) == "credential revoked"


# --- sync and listeners --------------------------------------------------------------------


async def test_sync_applies_entries_written_after_load(
    storage: Storage, clock: FakeClock, feeds: Callable[..., RevocationFeed]
) -> None:
    feed = feeds()
    await feed.load()
    assert feed.state.seq == 0
    await new_task(storage, clock, "t1", "c1", "c2")
    await storage.end_task("t1", TaskState.CANCELLED, "abandoned", clock.advance(1))
    await storage.set_agent_state(AGENT, AgentState.QUARANTINED, clock.advance(1))
    assert feed.state.refusal(standing(task_id="t1")) is None  # not yet
    await feed.sync()
    assert feed.state.refusal(standing(task_id="t1")) == "task ended"
    assert feed.state.refusal(standing(agent_id=AGENT)) == "agent quarantined"
    assert feed.state.seq == await storage.last_revocation_seq()
    # Nothing new: nothing applied.
    applied = feed.applied
    await feed.sync()
    assert feed.applied == applied
    # The agent resumed: the later entry wins.
    await storage.set_agent_state(AGENT, AgentState.ACTIVE, clock.advance(1))
    await feed.sync()
    assert feed.state.refusal(standing(agent_id=AGENT)) is None
    assert feed.state.refusal(standing(task_id="t1")) == "task ended"


async def test_listeners_are_told_each_batch(
    storage: Storage, clock: FakeClock, feeds: Callable[..., RevocationFeed]
) -> None:
    feed = feeds()
    batches: list[list[Revocation]] = []

    def broken(_entries: list[Revocation]) -> None:
        raise RuntimeError("a listener that fails")

    feed.listeners.append(broken)  # its failure stops neither the feed nor the others
    feed.listeners.append(batches.append)
    await feed.load()
    assert batches == []  # nothing to tell

    task = make_task(clock.now(), "t1")
    creds = [
        make_credential(task, "root", clock.now()),
        make_credential(task, "child", clock.now(), parent_jti="root"),
        make_credential(task, "grandchild", clock.now(), parent_jti="child"),
    ]
    await storage.create_task(task, creds)
    await storage.revoke_credential("root", "leaked", clock.advance(1))
    await feed.sync()
    assert len(batches) == 1
    assert {e.subject for e in batches[0]} == {"root", "child", "grandchild"}
    assert all(e.kind is RevocationKind.CREDENTIAL for e in batches[0])
    assert feed.state.refusal(standing(jti="grandchild")) == "credential revoked"

    await storage.set_agent_state(AGENT, AgentState.SUSPENDED, clock.advance(1))
    await feed.sync()
    # One batch: the agent's entry and the end of its live task, from one transaction.
    assert [sorted(e.kind for e in batch) for batch in batches[1:]] == [
        [RevocationKind.AGENT, RevocationKind.TASK]
    ]
    await feed.sync()
    assert len(batches) == 2


async def test_a_key_withdrawn_elsewhere_leaves_this_keyring(url: str, clock: FakeClock) -> None:
    """A KEY entry reloads the real KeyManager of :func:`open_services` (the listener it
    registers on its feed), so the withdrawn key stops verifying in this process."""
    settings = make_settings(url)
    services = await open_services(settings, clock=clock)
    try:
        keys = services.keys
        feed = services.revocations
        old = keys.signer(KeyPurpose.CREDENTIALS).kid
        assert old in keys.keyring(KeyPurpose.CREDENTIALS).kids()
        # Another process (its own KeyManager, on the same store) withdraws the active key.
        elsewhere = KeyManager(
            services.storage,
            services.box,
            clock,
            algorithm=settings.keys.algorithm,
            overlap=timedelta(minutes=5),
        )
        await elsewhere.reload()
        assert await elsewhere.withdraw(old, cause="admin:tok-1", reason="leaked") == 0
        stored = await services.storage.list_keys()
        (replacement,) = [
            k for k in stored if k.purpose is KeyPurpose.CREDENTIALS and k.state is KeyState.ACTIVE
        ]
        assert old not in {k.kid for k in stored}
        # This process still trusts the old key until its feed tells it.
        assert old in keys.keyring(KeyPurpose.CREDENTIALS).kids()
        await feed.sync()
        assert feed.state.refusal(standing(kid=old)) == "signing key withdrawn"
        await eventually(
            lambda: old not in keys.keyring(KeyPurpose.CREDENTIALS).kids(),
            "the keyring drops the withdrawn key",
        )
        assert keys.signer(KeyPurpose.CREDENTIALS).kid == replacement.kid
        assert [k["kid"] for k in keys.jwks(KeyPurpose.CREDENTIALS)["keys"]] == [replacement.kid]
    finally:
        await services.aclose()
