"""The report benchmark still runs (tiny sizes; nothing about speed is asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
