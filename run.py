#!/usr/bin/env python3
"""Set-up and entry point for a fresh machine that has only Python 3.11+.

    python3 run.py demo    # install into .venv if needed, run the server with the demo
    python3 run.py test    # install into .venv if needed, run the gate: lint, types, tests

Anything after the command is passed on (e.g. `python3 run.py demo --port 9000`,
`python3 run.py test -k tokens`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".taskbound-installed"


def _python() -> str:
    return str(BIN / "python")


def ensure_env() -> None:
    """Create .venv and install the project with its dev tools, once per pyproject change."""
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py runs under any python3
        sys.exit("taskbound needs Python 3.11 or newer")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and Path(_python()).exists():
        return
    if not Path(_python()).exists():
        print("creating .venv …", flush=True)
        venv.create(VENV, with_pip=True)
    print("installing taskbound and its dev tools into .venv …", flush=True)
    subprocess.run([_python(), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([_python(), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def gate(extra: list[str]) -> int:
    """Lint, types, tests: the one gate that CI runs unchanged."""
    steps = [
        ["ruff", "check", "src", "tests", "bench", "examples", "run.py"],
        ["ruff", "format", "--check", "src", "tests", "bench", "examples", "run.py"],
        ["mypy"],
        # One worker per core (pytest-xdist); `-n 0` in extra runs in this process.
        ["pytest", "-n", "auto", *extra],
    ]
    for step in steps:
        print(f"\n==> {' '.join(step)}", flush=True)
        result = subprocess.run([str(BIN / step[0]), *step[1:]], cwd=ROOT)
        if result.returncode != 0:
            return result.returncode
    return 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "shell"):
        print(__doc__)
        return 2
    command, extra = sys.argv[1], sys.argv[2:]
    ensure_env()
    if command == "test":
        return gate(extra)
    if command == "demo":
        return subprocess.run(
            [str(BIN / "taskbound"), "serve", "--demo", *extra], cwd=ROOT
        ).returncode
    return subprocess.run([str(BIN / "taskbound"), *extra], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
