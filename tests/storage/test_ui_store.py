"""The web UI's sign-in store (local passwords, server-side sessions), conformance-tested on
memory, SQLite and PostgreSQL (conftest.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from taskbound.core.clock import FakeClock
from taskbound.core.model import UiSession
from taskbound.errors import Conflict, ReferenceError_
from taskbound.storage import Storage
from tests.storage.test_conformance import IST, make_owner

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA"
OTHER_HASH = "$argon2id$v=19$m=65536,t=3,p=4$bmV3c2FsdG5ld3NhbHQ$bmV3aGFzaG5ld2hhc2g"
SESSION_LIFE = timedelta(hours=8)
TICK = timedelta(microseconds=1)


def make_session(
    now: datetime, id_hash: str = "sha256-1", owner_id: str = "alice", **changes: object
) -> UiSession:
    session = UiSession(
        id_hash=id_hash,
        owner_id=owner_id,
        method="password",
        csrf="csrf-" + id_hash,
        created_at=now,
        expires_at=now + SESSION_LIFE,
    )
    return replace(session, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def owners(storage: Storage, clock: FakeClock) -> Storage:
    """``storage`` with the owners ``alice`` and ``bob``."""
    await storage.create_owner(make_owner(clock.now()))
    await storage.create_owner(make_owner(clock.now(), "bob"))
    return storage


async def live_ids(storage: Storage, now: datetime, *id_hashes: str) -> set[str]:
    found = set()
    for id_hash in id_hashes:
        session = await storage.get_session(id_hash, now)
        if session is not None:
            found.add(session.id_hash)
    return found


# --- passwords -----------------------------------------------------------------------------


async def test_set_get_and_replace_a_password(owners: Storage, clock: FakeClock) -> None:
    assert await owners.get_owner_password("alice") is None
    await owners.set_owner_password("alice", HASH, clock.now())
    assert await owners.get_owner_password("alice") == HASH
    assert await owners.get_owner_password("bob") is None
    await owners.set_owner_password("alice", OTHER_HASH, clock.advance(60))
    assert await owners.get_owner_password("alice") == OTHER_HASH
    await owners.set_owner_password("bob", HASH, clock.now().astimezone(IST))
    assert await owners.get_owner_password("bob") == HASH
    assert await owners.get_owner_password("alice") == OTHER_HASH
    assert await owners.get_owner_password("nobody") is None
    assert await owners.get_owner_password("alice\x00") is None


async def test_a_password_needs_its_owner(owners: Storage, clock: FakeClock) -> None:
    with pytest.raises(ReferenceError_):
        await owners.set_owner_password("nobody", HASH, clock.now())
    assert await owners.get_owner_password("nobody") is None
    with pytest.raises(ValueError, match="NUL"):
        await owners.set_owner_password("alice", "hash\x00", clock.now())
    with pytest.raises(ValueError, match="NUL"):
        await owners.set_owner_password("alice\x00", HASH, clock.now())
    with pytest.raises(ValueError, match="naive"):
        await owners.set_owner_password("alice", HASH, clock.now().replace(tzinfo=None))
    assert await owners.get_owner_password("alice") is None


async def test_setting_a_password_signs_that_owner_out_everywhere(
    owners: Storage, clock: FakeClock
) -> None:
    now = clock.now()
    for id_hash, owner_id in (("a-1", "alice"), ("a-2", "alice"), ("b-1", "bob")):
        await owners.create_session(make_session(now, id_hash, owner_id))
    await owners.set_owner_password("alice", HASH, clock.advance(1))
    assert await live_ids(owners, clock.now(), "a-1", "a-2", "b-1") == {"b-1"}

    # Replacing it does too, and only for that owner.
    await owners.create_session(make_session(clock.now(), "a-3"))
    await owners.set_owner_password("alice", OTHER_HASH, clock.advance(1))
    assert await live_ids(owners, clock.now(), "a-3", "b-1") == {"b-1"}

    # A refused change signs nobody out.
    await owners.create_session(make_session(clock.now(), "a-4"))
    with pytest.raises(ReferenceError_):
        await owners.set_owner_password("nobody", HASH, clock.now())
    with pytest.raises(ValueError, match="NUL"):
        await owners.set_owner_password("alice", "x\x00", clock.now())
    assert await live_ids(owners, clock.now(), "a-4", "b-1") == {"a-4", "b-1"}
    assert await owners.get_owner_password("alice") == OTHER_HASH


# --- sessions ------------------------------------------------------------------------------


async def test_session_round_trip(owners: Storage, clock: FakeClock) -> None:
    clock.advance(0.654321)
    session = make_session(clock.now().astimezone(IST), method="oidc", csrf="tok-ü✓")
    await owners.create_session(session)
    got = await owners.get_session("sha256-1", clock.now())
    assert got == session
    assert got is not None
    assert got.created_at.tzinfo is UTC
    assert got.expires_at.tzinfo is UTC
    assert got.created_at.microsecond == 654321
    assert (got.owner_id, got.method, got.csrf) == ("alice", "oidc", "tok-ü✓")
    assert await owners.get_session("sha256-nope", clock.now()) is None
    assert await owners.get_session("sha256-1\x00", clock.now()) is None
    # Found before the session was created too: only its expiry limits it.
    assert await owners.get_session("sha256-1", clock.now() - timedelta(days=1)) == session


async def test_an_expired_session_is_not_found(owners: Storage, clock: FakeClock) -> None:
    session = make_session(clock.now())
    await owners.create_session(session)
    expiry = session.expires_at
    assert await owners.get_session("sha256-1", expiry - TICK) == session
    assert await owners.get_session("sha256-1", expiry) is None
    assert await owners.get_session("sha256-1", expiry.astimezone(IST)) is None
    assert await owners.get_session("sha256-1", expiry + timedelta(days=1)) is None
    # Still stored until deleted or pruned: earlier it is found.
    assert await owners.get_session("sha256-1", expiry - TICK) == session


async def test_delete_session(owners: Storage, clock: FakeClock) -> None:
    now = clock.now()
    await owners.create_session(make_session(now, "s-1"))
    await owners.create_session(make_session(now, "s-2"))
    await owners.delete_session("s-1")
    assert await live_ids(owners, now, "s-1", "s-2") == {"s-2"}
    await owners.delete_session("s-1")  # gone already: nothing to do
    await owners.delete_session("s-nope")
    await owners.delete_session("s-2\x00")
    assert await live_ids(owners, now, "s-1", "s-2") == {"s-2"}
    # A deleted id may be used again.
    await owners.create_session(make_session(now, "s-1", "bob"))
    got = await owners.get_session("s-1", now)
    assert got is not None
    assert got.owner_id == "bob"


async def test_prune_removes_only_expired_sessions(owners: Storage, clock: FakeClock) -> None:
    start = clock.now()
    lives = {"s-short": 60, "s-edge": 120, "s-long": 3600, "s-bob": 90}
    for id_hash, seconds in lives.items():
        owner_id = "bob" if id_hash == "s-bob" else "alice"
        await owners.create_session(
            make_session(start, id_hash, owner_id, expires_at=start + timedelta(seconds=seconds))
        )
    assert await owners.prune_sessions(start) == 0
    # At an expiry instant the session is expired and pruned.
    assert await owners.prune_sessions(start + timedelta(seconds=90)) == 2
    edge = start + timedelta(seconds=120)
    assert await live_ids(owners, edge - TICK, *lives) == {"s-edge", "s-long"}
    assert await owners.prune_sessions(edge - TICK) == 0
    assert await owners.prune_sessions(edge.astimezone(IST)) == 1
    assert await owners.prune_sessions(edge) == 0
    assert await live_ids(owners, start, *lives) == {"s-long"}
    assert await owners.prune_sessions(start + timedelta(days=1)) == 1
    assert await live_ids(owners, start, *lives) == set()
    assert await owners.prune_sessions(start + timedelta(days=2)) == 0


async def test_create_session_refusals(owners: Storage, clock: FakeClock) -> None:
    now = clock.now()
    with pytest.raises(ReferenceError_):
        await owners.create_session(make_session(now, owner_id="nobody"))
    assert await owners.get_session("sha256-1", now) is None
    original = make_session(now)
    await owners.create_session(original)
    with pytest.raises(Conflict):
        await owners.create_session(make_session(now + TICK, owner_id="bob", csrf="other"))
    assert await owners.get_session("sha256-1", now) == original
    with pytest.raises(ValueError, match="NUL"):
        await owners.create_session(make_session(now, "s-nul", csrf="a\x00b"))
    with pytest.raises(ValueError, match="naive"):
        await owners.create_session(make_session(now.replace(tzinfo=None), "s-naive"))
    assert await live_ids(owners, now, "sha256-1", "s-nul", "s-naive") == {"sha256-1"}
    assert await owners.prune_sessions(now + timedelta(days=1)) == 1
