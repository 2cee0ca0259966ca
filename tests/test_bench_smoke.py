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
