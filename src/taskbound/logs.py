"""Structured logs: one JSON object per line (or readable lines for a console).

Fields passed with ``extra=`` become keys of the record. Nothing secret is ever passed to
a logger: tokens are logged by their ``jti`` or id only.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import Any

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _printable(value: Any) -> str:
    """Text safe for one console line: values that carry control characters (which could
    forge or hide log lines) are shown escaped."""
    text = str(value)
    return text if text.isprintable() else repr(text)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={_printable(v)}"
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")
        )
        line = f"{record.levelname.lower():7} {record.name}: {_printable(record.getMessage())}"
        return f"{line}  {extras}" if extras else line


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger("taskbound")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # joserfc warns on every EdDSA signature because RFC 9864 renames the algorithm;
    # taskbound keeps the name for interoperability (DESIGN.md §4), so the warning is noise
    # in a server's log.
    warnings.filterwarnings("ignore", message="EdDSA is deprecated via RFC 9864")
