"""Reports on a live server (SQLite): the admin API, the CLI and the web UI, with
``services.reports`` serving the samples of tests/reports/samples.py (FakeReports)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskbound.core.clock import FakeClock
from tests.api.conftest import Live, make_settings, start_live
from tests.reports.deployment import deploy
from tests.reports.samples import FakeReports


@pytest.fixture
async def server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Live]:
    """A live server whose ``services.reports`` serves the samples."""
    settings = make_settings(tmp_path, storage={"url": f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"})
    async for live in start_live(settings, clock):
        # Set as an attribute: the runtime's own computations are replaced for these tests.
        setattr(live.services, "reports", FakeReports())  # noqa: B010
        yield live


@pytest.fixture
async def deployment(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Live]:
    """A live server with the real computations over tests/reports/deployment.py."""
    settings = make_settings(tmp_path, storage={"url": f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"})
    async for live in start_live(settings, clock):
        await deploy(live)
        yield live


def fake(live: Live) -> FakeReports:
    found = getattr(live.services, "reports")  # noqa: B009
    assert isinstance(found, FakeReports)
    return found
