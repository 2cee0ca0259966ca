"""What a report is asked for, read the same way by the admin API, the web UI and the CLI:
the kind, the window (``since`` / ``until``) and the subject filters, checked once and then
passed to ``services.reports`` (the CONTRACT in taskbound.service.reports).

Times are RFC 3339 with a zone (``2025-03-01T09:00:00Z``), a date (``2025-03-01``: midnight
UTC; as ``until`` the end of that day) or a duration ago (``7d``, ``24h``, ``90m``, ``2w``).
The default window is the last 30 days.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Protocol

from taskbound.errors import InvalidRequest

__all__ = [
    "DEFAULT_WINDOW",
    "FILTERS",
    "KINDS",
    "ReportRequest",
    "Reports",
    "parse_report_request",
    "parse_time",
    "run_report",
]

#: The report kinds as they appear in URLs and commands -> the contract's ``kind``.
KINDS: Final = {
    "posture": "posture",
    "usage": "usage",
    "blast-radius": "blast_radius",
    "alignment": "alignment",
}
DEFAULT_WINDOW: Final = timedelta(days=30)
#: The filters each kind accepts (anything else given is refused, never ignored).
FILTERS: Final = {
    "posture": frozenset({"since", "until"}),
    "usage": frozenset({"since", "until", "agent", "owner"}),
    "blast-radius": frozenset({"agent", "task", "credential"}),
    "alignment": frozenset(),
}
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION: Final = re.compile(r"(?:\d{1,6}[smhdw])+")
_PART: Final = re.compile(r"(\d+)([smhdw])")
_MAX_ID: Final = 2048


class Reports(Protocol):
    """``services.reports``: the computations, each returning the contract's dict."""

    async def usage(
        self, since: datetime, until: datetime, agent: str | None = None, owner: str | None = None
    ) -> dict[str, Any]: ...

    async def posture(self, since: datetime, until: datetime) -> dict[str, Any]: ...

    async def blast_radius(
        self, agent: str | None = None, task: str | None = None, credential: str | None = None
    ) -> dict[str, Any]: ...

    async def alignment(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ReportRequest:
    """One report asked for, checked."""

    kind: str  # as in URLs: posture, usage, blast-radius, alignment
    since: datetime | None = None
    until: datetime | None = None
    agent: str | None = None
    owner: str | None = None
    task: str | None = None
    credential: str | None = None

    def query(self) -> dict[str, str]:
        """The request as query parameters (for links and the CLI)."""
        out = {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "agent": self.agent,
            "owner": self.owner,
            "task": self.task,
            "credential": self.credential,
        }
        return {k: v for k, v in out.items() if v}


def parse_time(text: str, name: str, now: datetime, *, end: bool = False) -> datetime:
    """``text`` as an aware UTC time (see the module); InvalidRequest naming ``name``."""
    value = text.strip()
    try:
        if _DURATION.fullmatch(value.lower()):
            seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value.lower()))
            return now - timedelta(seconds=seconds)
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        when = datetime.fromisoformat(value.replace("z", "Z"))
        if when.tzinfo is None or when.utcoffset() is None:
            raise InvalidRequest(f"{name} needs a time zone (e.g. Z or +01:00)")
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: a duration or a date at the edge of what a datetime can hold.
        raise InvalidRequest(
            f"{name} must be an RFC 3339 time with a zone, a date (YYYY-MM-DD) or a "
            "duration ago (7d, 24h, 30m), within years 1 to 9999"
        ) from None


def parse_report_request(kind: str, params: Mapping[str, str], now: datetime) -> ReportRequest:
    """The report ``kind`` with ``params`` (query parameters or CLI options), checked:
    InvalidRequest for an unknown kind, an unknown or misplaced filter, a bad time, an
    empty window, or not exactly one blast-radius subject."""
    if kind not in KINDS:
        raise InvalidRequest(f"the report kind must be one of {', '.join(KINDS)}")
    given = {k: v for k, v in params.items() if k != "format" and v != ""}
    extra = sorted(set(given) - FILTERS[kind])
    if extra:
        allowed = ", ".join(sorted(FILTERS[kind])) or "none"
        raise InvalidRequest(
            f"the {kind} report takes no {', '.join(extra)} (its parameters: {allowed})"
        )
    for name, value in given.items():
        if len(value) > _MAX_ID:
            raise InvalidRequest(f"{name} is too long")
    since = until = None
    if kind in ("posture", "usage"):
        until = parse_time(given["until"], "until", now, end=True) if "until" in given else now
        since = (
            parse_time(given["since"], "since", now) if "since" in given else until - DEFAULT_WINDOW
        )
        if since >= until:
            raise InvalidRequest("since must be before until")
    if kind == "blast-radius":
        subjects = [k for k in ("agent", "task", "credential") if k in given]
        if len(subjects) != 1:
            raise InvalidRequest(
                "the blast-radius report needs exactly one of agent, task, credential"
            )
    return ReportRequest(
        kind=kind,
        since=since,
        until=until,
        agent=given.get("agent"),
        owner=given.get("owner"),
        task=given.get("task"),
        credential=given.get("credential"),
    )


async def run_report(reports: Reports, request: ReportRequest) -> dict[str, Any]:
    """The contract's dict for ``request``; the computations' errors pass through."""
    if request.kind in ("usage", "posture"):
        if request.since is None or request.until is None:
            raise InvalidRequest(f"the {request.kind} report needs a window")
        if request.kind == "posture":
            return await reports.posture(request.since, request.until)
        return await reports.usage(
            request.since, request.until, agent=request.agent, owner=request.owner
        )
    if request.kind == "blast-radius":
        return await reports.blast_radius(
            agent=request.agent, task=request.task, credential=request.credential
        )
    return await reports.alignment()
