"""`GET /v1/admin/reports/{kind}` on a live server: admin authentication, the contract's
JSON as the computations return it, ``?format=html``, parameters checked (400), an unknown
agent (404) and a report that cannot be made (its code, never an empty "all good")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.api.conftest import Live
from tests.reports.conftest import fake
from tests.reports.deployment import CALLS, TRIAGE
from tests.reports.samples import BOT, SAMPLES, FakeReports

KINDS = {"posture": "posture", "usage": "usage", "blast-radius": "blast_radius"}
KINDS["alignment"] = "alignment"


def path(kind: str) -> str:
    return f"/v1/admin/reports/{kind}"


def subject(kind: str) -> dict[str, str]:
    return {"agent": BOT} if kind == "blast-radius" else {}


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_reports_need_an_admin_token(server: Live, kind: str) -> None:
    r = await server.http.get(path(kind), params=subject(kind))
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_admin_token"
    r = await server.http.get(
        path(kind), params=subject(kind), headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401
    assert fake(server).calls == []


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_json_is_the_report_as_computed(server: Live, kind: str) -> None:
    r = await server.http.get(path(kind), params=subject(kind), headers=server.admin)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"].startswith("no-store")
    assert r.json() == SAMPLES[KINDS[kind]]


async def test_the_default_window_is_the_last_30_days(server: Live) -> None:
    r = await server.http.get(path("usage"), headers=server.admin)
    assert r.status_code == 200
    name, args = fake(server).calls[-1]
    now = server.clock.now()
    assert name == "usage"
    assert args == {"since": now - timedelta(days=30), "until": now, "agent": None, "owner": None}


async def test_windows_filters_and_durations_reach_the_computation(server: Live) -> None:
    r = await server.http.get(
        path("usage"),
        params={"since": "7d", "until": "2099-01-31", "agent": BOT, "owner": "alice"},
        headers=server.admin,
    )
    assert r.status_code == 200, r.text
    _, args = fake(server).calls[-1]
    assert args == {
        "since": server.clock.now() - timedelta(days=7),
        "until": datetime(2099, 2, 1, tzinfo=UTC),  # a date as until: the end of that day
        "agent": BOT,
        "owner": "alice",
    }
    r = await server.http.get(
        path("posture"),
        params={"since": "2025-03-01T09:00:00+01:00", "until": "2025-03-02T00:00:00Z"},
        headers=server.admin,
    )
    assert r.status_code == 200, r.text
    assert fake(server).calls[-1] == (
        "posture",
        {
            "since": datetime(2025, 3, 1, 8, tzinfo=UTC),
            "until": datetime(2025, 3, 2, tzinfo=UTC),
        },
    )
    r = await server.http.get(path("blast-radius"), params={"task": "tsk_1"}, headers=server.admin)
    assert r.status_code == 200
    assert fake(server).calls[-1] == (
        "blast_radius",
        {"agent": None, "task": "tsk_1", "credential": None},
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_html_is_the_self_contained_report(server: Live, kind: str) -> None:
    params = subject(kind) | {"format": "html"}
    r = await server.http.get(path(kind), params=params, headers=server.admin)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert f"taskbound-{kind}-report.html" in r.headers["content-disposition"]
    assert r.text.lstrip().startswith("<!doctype html>")
    assert "<script" not in r.text


@pytest.mark.parametrize(
    ("kind", "params", "says"),
    [
        ("usage", {"since": "yesterday"}, "since must be"),
        ("usage", {"until": "2025-03-01T09:00:00"}, "needs a time zone"),
        ("usage", {"since": "2025-03-02", "until": "2025-03-01"}, "since must be before until"),
        ("posture", {"agent": BOT}, "takes no agent"),
        ("alignment", {"since": "7d"}, "takes no since"),
        ("blast-radius", {}, "exactly one of agent, task, credential"),
        ("blast-radius", {"agent": BOT, "task": "tsk_1"}, "exactly one"),
        ("usage", {"format": "pdf"}, "format must be json or html"),
        ("usage", {"colour": "red"}, "takes no colour"),
        ("usage", {"agent": "x" * 3000}, "too long"),
        ("nonsense", {}, "must be one of posture, usage, blast-radius, alignment"),
        ("usage", {"since": "999999w"}, "within years 1 to 9999"),
        ("usage", {"until": "9999-12-31"}, "within years 1 to 9999"),
        ("usage", {"since": "0001-01-01T00:00:00+01:00"}, "within years 1 to 9999"),
    ],
)
async def test_bad_parameters_are_400_invalid_request(
    server: Live, kind: str, params: dict[str, str], says: str
) -> None:
    r = await server.http.get(path(kind), params=params, headers=server.admin)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "invalid_request"
    assert says in body["detail"]
    assert fake(server).calls == []


async def test_a_parameter_given_twice_is_refused(server: Live) -> None:
    r = await server.http.get(path("usage") + "?agent=a&agent=b", headers=server.admin)
    assert r.status_code == 400
    assert "once" in r.json()["detail"]


@pytest.mark.parametrize("kind", ["usage", "blast-radius"])
async def test_an_unknown_agent_is_404(server: Live, kind: str) -> None:
    agent = "spiffe://taskbound.local/agents/nobody"
    for fmt in ("json", "html"):
        r = await server.http.get(
            path(kind), params={"agent": agent, "format": fmt}, headers=server.admin
        )
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "not_found"


async def test_a_report_that_cannot_be_made_is_refused_with_its_code(server: Live) -> None:
    setattr(server.services, "reports", FakeReports(broken=True))  # noqa: B010
    for kind in KINDS:
        r = await server.http.get(path(kind), params=subject(kind), headers=server.admin)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "policy_invalid"
        assert "failed to load" in r.json()["detail"]


async def test_an_empty_window_is_a_report_that_says_empty(server: Live) -> None:
    setattr(server.services, "reports", FakeReports(empty=True))  # noqa: B010
    r = await server.http.get(path("usage"), headers=server.admin)
    assert r.status_code == 200
    assert r.json()["empty"] is True
    r = await server.http.get(path("usage"), params={"format": "html"}, headers=server.admin)
    assert "No data in this window." in r.text


# --- the real computations (tests/reports/deployment.py) -------------------------------


async def test_the_real_reports_answer_the_contracts_shape(deployment: Live) -> None:
    live = deployment
    r = await live.http.get(path("usage"), headers=live.admin)
    assert r.status_code == 200, r.text
    usage = r.json()
    assert usage["kind"] == "usage"
    assert usage["empty"] is False
    assert usage["totals"]["calls"] == sum(c[-1] for c in CALLS)
    assert {a["agent"] for a in usage["agents"]} == {BOT, TRIAGE}
    for kind, params in (
        ("posture", {}),
        ("blast-radius", {"agent": BOT}),
        ("alignment", {}),
    ):
        r = await live.http.get(path(kind), params=params, headers=live.admin)
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == KINDS[kind]
        r = await live.http.get(path(kind), params=params | {"format": "html"}, headers=live.admin)
        assert r.status_code == 200
        assert "This report could not be made" not in r.text


async def test_the_real_reports_refuse_an_unknown_agent_and_say_empty(deployment: Live) -> None:
    live = deployment
    nobody = "spiffe://taskbound.local/agents/nobody"
    for kind in ("usage", "blast-radius"):
        r = await live.http.get(path(kind), params={"agent": nobody}, headers=live.admin)
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "not_found"
    r = await live.http.get(
        path("usage"), params={"since": "2001-01-01", "until": "2001-01-31"}, headers=live.admin
    )
    assert r.status_code == 200
    assert r.json()["empty"] is True
    r = await live.http.get(
        path("usage"),
        params={"since": "2001-01-01", "until": "2001-01-31", "format": "html"},
        headers=live.admin,
    )
    assert "No data in this window." in r.text


def test_a_window_is_utc_and_bounded() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from taskbound.errors import InvalidRequest
    from taskbound.service.reports import MAX_WINDOW, ReportService

    plus5 = timezone(timedelta(hours=5))
    window = ReportService.window(
        datetime(2026, 3, 1, 2, 0, tzinfo=plus5), datetime(2026, 3, 2, tzinfo=plus5)
    )
    assert window.since == datetime(2026, 2, 28, 21, 0, tzinfo=UTC)
    assert window.since.tzinfo is UTC
    start = datetime(2025, 1, 1, tzinfo=UTC)
    ReportService.window(start, start + MAX_WINDOW)
    with pytest.raises(InvalidRequest, match="at most 400 days"):
        ReportService.window(start, start + MAX_WINDOW + timedelta(seconds=1))
