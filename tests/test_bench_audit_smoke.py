"""The audit chain benchmark still runs (tiny sizes; nothing about speed is asserted here —
speed is measured by running bench/audit.py itself): on SQLite alone, then on PostgreSQL
too (skipped without it, failed when TASKBOUND_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.services import postgres_url

ROOT = Path(__file__).resolve().parents[1]


def run_bench(postgres: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "audit.py"),
            "--records",
            "200",
            "--postgres",
            postgres,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def section(out: str, name: str) -> str:
    """What the benchmark printed for one database."""
    start = out.index(f"{name}: appends")
    ends = [out.find(f"PostgreSQL: {s}", start + 1) for s in ("appends", "skipped")]
    return out[start : min([e for e in ends if e > 0], default=len(out))]


def assert_measured(out: str) -> None:
    rate = r"\s+[\d.]+ records/s"
    for label in (
        "one record per commit (20)",
        "append_audits, 64 a commit (100)",
        "AuditWriter, 64 callers (100)",
    ):
        line = re.escape(label) + rate + r"\s+raw" + rate + r"\s+ratio raw / chained\s+[\d.]+x"
        assert re.search(line, out), out
    assert re.search(r": verification of 220 records", out), out
    for label in ("raw: RFC 8785 + SHA-256", "raw: SHA-256 of canonical bytes"):
        assert re.search(re.escape(label) + rate + r"\s+ratio raw / verify", out), out
    assert "AuditWriter: " in out, out
    assert "the chain alone (audit.chain in memory)" in out, out


def test_audit_benchmark_runs_on_sqlite() -> None:
    out = run_bench("")
    assert_measured(section(out, "SQLite (file, WAL, synchronous=2)"))
    assert "PostgreSQL: skipped" in out, out


def test_audit_benchmark_runs_on_postgres() -> None:
    out = run_bench(postgres_url())
    assert_measured(section(out, "PostgreSQL"))
