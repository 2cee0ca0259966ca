"""The benchmarks still run (tiny sizes; nothing about speed is asserted here — speed is
measured by running bench/ itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_task_start_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "issue.py"), "--tasks", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio raw signing / service credentials" in result.stdout


def test_gateway_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gateway.py"), "--requests", "100"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("ratio full / parts", "raw limit: one bare durable SQLite commit", "gateway adds"):
        assert line in result.stdout


def test_sdk_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sdk.py"), "--requests", "20", "--tasks", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("ratio SDK / raw (tool call, p50)", "ratio SDK / raw (task life, p50)"):
        assert line in result.stdout


def test_report_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--records", "2000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("raw agg s", "growth 200 -> 2,000 records", "report time for 2,000 records"):
        assert line in result.stdout
