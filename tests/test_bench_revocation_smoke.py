"""The revocation benchmark still runs (--quick sizes; nothing about speed is asserted here —
speed is measured by running bench/revocation.py itself). Needs PostgreSQL: skipped without
it, failed when TASKBOUND_REQUIRE_SERVICES=1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.services import postgres_url

ROOT = Path(__file__).resolve().parents[1]


def test_revocation_benchmark_runs() -> None:
    url = postgres_url()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "revocation.py"), "--quick", "--postgres", url],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for line in (
        "propagation replica A -> replica B over PostgreSQL, 100 revocations",
        "raw: pg_notify sent -> received",
        "feed: commit returned -> applied",
        "goal: commit -> applied p99 under 100 ms",
        "memory of 100,000 live credential revocations",
        "ratio state / set (tracemalloc)",
        "refusal() live",
    ):
        assert line in out, out
    assert "never applied" not in out, out
    assert "not received" not in out, out
