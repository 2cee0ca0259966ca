"""Hostile review of revocation around delegation: races between an exchange and a change
of the delegate's standing. Tests that fail on the code they were written against name a
finding in their docstring ("FINDING")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from taskbound.core.clock import FakeClock
from taskbound.core.model import AgentState
from tests.api.test_delegation import (
    SUB,
    Hop,
    World,
    assert_status,
    open_world,
)


@pytest.fixture(name="world", params=["sqlite", "postgres"])
async def _world(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[World]:
    async with open_world(str(request.param), tmp_path, clock) as w:
        yield w


async def test_a_delegate_suspended_during_its_exchange_stays_revoked_after_resume(
    world: World,
) -> None:
    """FINDING: Broker.exchange checks that the delegate is active before it stores the
    child, but storage.add_derived_credential does not re-check (or lock) the delegate's
    row. A suspension committed in between revokes the delegate's credentials *without*
    the child, which is inserted just after. The gateway refuses it while the delegate is
    suspended (the chain's agents are checked), but once the delegate is resumed the
    child, never revoked, works again: a resumed agent gets authority back."""
    services = world.live.services
    storage = services.storage
    original = storage.add_derived_credential
    raced: list[bool] = []

    async def suspend_first(*args: Any, **kwargs: Any) -> bool:
        if not raced:
            raced.append(True)
            _, changed = await services.registry.set_agent_state(
                SUB, AgentState.SUSPENDED, cause="test", reason="race"
            )
            assert changed
        return await original(*args, **kwargs)

    orch = await world.root()
    sub_agent = await world.agent(SUB)
    storage.add_derived_credential = suspend_first  # type: ignore[method-assign]
    try:
        r = await world.exchange(orch, sub_agent)
    finally:
        storage.add_derived_credential = original  # type: ignore[method-assign]
    assert raced
    if r.status_code != 200:
        return  # refused: the race is closed
    child = Hop(sub_agent, r.json()["access_token"])
    assert_status(await world.call(child), 401, "invalid_token")
    _, changed = await services.registry.set_agent_state(
        SUB, AgentState.ACTIVE, cause="test", reason="resume"
    )
    assert changed
    assert_status(await world.call(child), 401, "invalid_token")
    row = await storage.get_credential(child.jti)
    assert row is not None
    assert row.revoked_at is not None, "the child escaped the suspension's revocation"
