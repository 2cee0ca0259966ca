"""The SDK benchmark still runs (tiny sizes; nothing about speed is asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
