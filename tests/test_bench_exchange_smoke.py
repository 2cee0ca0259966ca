"""The token exchange benchmark still runs (tiny sizes; nothing about speed is asserted
here — speed is measured by running bench/exchange.py itself): the service on SQLite and,
over HTTP, a `taskbound serve` subprocess; then the service on PostgreSQL (skipped without
it, failed when TASKBOUND_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.services import postgres_url

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "exchange.py"), "--exchanges", "5", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert re.search(r"raw Ed25519 signing of a delegated credential .* signatures/s", out), out
    return out


def assert_measured(out: str, *labels: str) -> None:
    for label in labels:
        # Every measurement ran all 5 exchanges and has its ratio to raw signing.
        assert re.search(re.escape(label) + r"\s+[\d.]+ exchanges/s .*\(5\)", out), out
        assert f"ratio raw signing / {label}" in out, out


def test_exchange_benchmark_runs_on_sqlite_and_over_http() -> None:
    out = run_bench("--seconds", "10")
    assert_measured(
        out,
        "service sqlite   concurrency  1",
        "service sqlite   concurrency 16",
        "http    serve    concurrency  1",
        "http    serve    concurrency 16",
    )
    assert "postgres" not in out


def test_exchange_benchmark_runs_on_postgres() -> None:
    out = run_bench("--seconds", "10", "--no-http", "--postgres", postgres_url())
    assert_measured(out, "service postgres concurrency  1", "service postgres concurrency 16")
    assert "http " not in out
