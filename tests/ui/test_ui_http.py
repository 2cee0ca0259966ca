"""The web UI over HTTP on a live server (SQLite and PostgreSQL): sign-in, sessions and
cookies, anti-forgery checks, security headers, roles, and approvals and break-glass
decided through the pages people use. The browser tests (test_browser.py) drive the same
pages in Chromium."""

from __future__ import annotations

import html
import re

from taskbound.core.model import Tier
from tests.api.conftest import AGENT, Live
from tests.api.test_approvals_api import held
from tests.ui.conftest import PASSWORD, Browser, add_people


async def audit_events(live: Live, event: str) -> list[object]:
    return [e for _, e in await live.services.storage.list_audit(limit=1000) if e.event == event]


async def test_pages_need_a_session_and_carry_strict_headers(live: Live) -> None:
    await add_people(live)
    b = Browser(live)
    r = await b.get("/ui/approvals")
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=%2Fui%2Fapprovals"
    r = await b.get("/ui/login")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp
    assert "frame-ancestors 'none'" in csp
    assert "form-action 'self'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "<script" not in r.text
    # The login form's own anti-forgery cookie: Secure, HttpOnly, __Host- prefixed.
    raw = r.headers["set-cookie"]
    assert raw.startswith("__Host-tb_login=")
    assert all(a in raw for a in ("Secure", "HttpOnly", "Path=/", "SameSite=lax"))


async def test_sign_in_sets_a_secure_session_and_sign_out_ends_it(live: Live) -> None:
    await add_people(live)
    b = Browser(live)
    r = await b.sign_in("carol")
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/ui/"
    raw = next(c for c in r.headers.get_list("set-cookie") if c.startswith("__Host-tb_session="))
    assert all(a in raw for a in ("Secure", "HttpOnly", "Path=/", "SameSite=lax", "Max-Age="))
    token = b.cookies["__Host-tb_session"]
    # Only the hash of the cookie is stored.
    stored = await live.services.storage.get_session(token, live.clock.now())
    assert stored is None
    r = await b.get("/ui/approvals")
    assert r.status_code == 200
    assert "carol" in r.text
    assert [e.owner for e in await audit_events(live, "ui.signin")] == ["carol"]  # type: ignore[attr-defined]
    r = await b.post("/ui/logout", {})
    assert r.status_code == 303
    assert "__Host-tb_session" not in b.cookies
    # The old cookie is dead on the server too.
    b.cookies["__Host-tb_session"] = token
    assert (await b.get("/ui/approvals")).status_code == 303


async def test_wrong_passwords_are_refused_alike_audited_and_throttled(live: Live) -> None:
    await add_people(live)
    b = Browser(live)
    for owner in ("carol", "nobody"):
        r = await b.sign_in(owner, "not the password at all")
        assert r.status_code == 401
        assert "signin_failed" in r.text
        assert "__Host-tb_session" not in b.cookies
    denied = await audit_events(live, "ui.signin")
    assert [e.code for e in denied] == ["signin_failed", "signin_failed"]  # type: ignore[attr-defined]
    limit = live.services.settings.ui.max_failed_signins
    for _ in range(limit):
        await b.sign_in("carol", "wrong again, wrong again")
    r = await b.sign_in("carol", PASSWORD)  # even the right one, while throttled
    assert r.status_code == 429
    assert "too_many_attempts" in r.text


async def test_session_expires_and_a_new_password_signs_out_everywhere(live: Live) -> None:
    await add_people(live)
    b = Browser(live)
    await b.sign_in("carol")
    assert (await b.get("/ui/approvals")).status_code == 200
    hashed = b"".hex()  # any change of password ends the sessions
    await live.services.storage.set_owner_password("carol", hashed or "x", live.clock.now())
    assert (await b.get("/ui/approvals")).status_code == 303
    await add_people(live, {"carol": ["approver"]})
    await b.sign_in("carol")
    live.clock.advance(live.services.settings.ui.session_ttl_seconds + 1)
    assert (await b.get("/ui/approvals")).status_code == 303


async def test_forms_need_the_sessions_token_and_a_same_origin(live: Live) -> None:
    await add_people(live)
    _, _, approval = await held(live)
    b = Browser(live)
    await b.sign_in("carol")
    page = await b.get(f"/ui/approvals/{approval}")
    token = b.csrf(page)
    for csrf, headers in (
        ("", {}),
        ("forged", {}),
        (token, {"Origin": "https://evil.example"}),
        (token, {"Sec-Fetch-Site": "cross-site"}),
        # "Origin: null" (what browsers send under no-referrer) only with the browser's
        # own same-origin Fetch metadata.
        (token, {"Origin": "null", "Sec-Fetch-Site": "same-site"}),
    ):
        r = await b.request(
            "POST",
            f"/ui/approvals/{approval}",
            data={"csrf": csrf, "decision": "approve"},
            headers=headers,
        )
        assert r.status_code == 403, (csrf, headers)
        assert "csrf_failed" in r.text
    state = await live.services.approvals.get(approval)
    assert state.approvals == 0
    r = await b.request(
        "POST",
        f"/ui/approvals/{approval}",
        data={"csrf": token, "decision": "approve"},
        headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    )
    assert r.status_code == 303
    await live.services.approvals.get(approval)
    # Another person's token does not work either.
    other = Browser(live)
    await other.sign_in("dan")
    await other.get("/ui/approvals")
    r = await b.post(f"/ui/approvals/{approval}", {"decision": "approve"}, csrf=other.csrf())
    assert r.status_code == 403


async def test_an_approver_sees_the_exact_call_and_approves_it(live: Live) -> None:
    await add_people(live)
    _, task_id, approval = await held(live, n="42")
    b = Browser(live)
    await b.sign_in("carol")
    inbox = await b.get("/ui/approvals")
    assert approval in inbox.text
    assert "issues.comment" in inbox.text
    page = await b.get(f"/ui/approvals/{approval}")
    assert "triage acme/web" in page.text
    assert "destructive-needs-approval" in page.text
    # Shown as the gateway decoded them (HTML-escaped, never raw markup).
    assert re.search(r'"n": "42"', html.unescape(page.text))
    assert AGENT in page.text
    assert task_id in page.text
    r = await b.post(f"/ui/approvals/{approval}", {"decision": "approve", "reason": ""})
    assert r.status_code == 303
    assert r.headers["location"] == f"/ui/approvals/{approval}?done=approved"
    after = await b.get(r.headers["location"])
    assert "Your approval was recorded." in after.text
    assert (await live.services.approvals.get(approval)).decided_by == "carol"
    votes = await audit_events(live, "approval.voted") + await audit_events(
        live, "approval.approved"
    )
    assert votes


async def test_separation_of_duties_holds_on_the_page(live: Live) -> None:
    await add_people(live)
    _, _, approval = await held(live)
    for owner, code in (("alice", "self_approval_not_allowed"), ("frank", "approver_not_allowed")):
        b = Browser(live)
        await b.sign_in(owner)
        await b.get(f"/ui/approvals/{approval}")
        r = await b.post(f"/ui/approvals/{approval}", {"decision": "approve"})
        assert r.status_code == 403, owner
        assert code in r.text
    b = Browser(live)
    await b.sign_in("carol")
    await b.get(f"/ui/approvals/{approval}")
    r = await b.post(f"/ui/approvals/{approval}", {"decision": "deny", "reason": ""})
    assert r.status_code == 400
    assert "reason_required" in r.text
    assert (await live.services.approvals.get(approval)).state.value == "pending"
    # No role at all: no page.
    g = Browser(live)
    await g.sign_in("gus")
    r = await g.get("/ui/approvals")
    assert r.status_code == 403
    assert "role_required" in r.text


async def test_admin_tier_needs_two_people_on_the_page(live: Live) -> None:
    await add_people(live)
    _, _, approval = await held(live, tier=Tier.ADMIN)
    for owner in ("carol", "dan"):
        b = Browser(live)
        await b.sign_in(owner)
        await b.get(f"/ui/approvals/{approval}")
        r = await b.post(f"/ui/approvals/{approval}", {"decision": "approve"})
        assert r.status_code == 303
    assert (await live.services.approvals.get(approval)).state.value == "approved"


async def test_break_glass_grant_end_and_review_through_the_pages(live: Live) -> None:
    await add_people(live)
    admin = Browser(live)
    await admin.sign_in("erin")
    page = await admin.get("/ui/breakglass")
    assert page.status_code == 200
    assert 'id="grant"' in page.text
    r = await admin.post(
        "/ui/breakglass",
        {"agent": AGENT, "scopes": "issues:admin", "justification": "short", "minutes": "30"},
    )
    assert r.status_code == 400
    assert "justification_too_short" in r.text
    r = await admin.post(
        "/ui/breakglass",
        {
            "agent": AGENT,
            "scopes": "issues:admin",
            "justification": "incident 4711: wipe the spam flood on acme/web",
            "minutes": "100000",
        },
    )
    assert r.status_code == 400
    assert "expiry_too_long" in r.text
    r = await admin.post(
        "/ui/breakglass",
        {
            "agent": AGENT,
            "scopes": "issues:admin",
            "justification": "incident 4711: wipe the spam flood on acme/web",
            "minutes": "30",
        },
    )
    assert r.status_code == 303, r.text
    bg_id = r.headers["location"].split("/")[-1].split("?")[0]
    page = await admin.get(f"/ui/breakglass/{bg_id}")
    assert "active" in page.text
    assert 'id="end"' in page.text
    # A reviewer cannot grant.
    rev = Browser(live)
    await rev.sign_in("frank")
    await rev.get("/ui/breakglass")
    r = await rev.post(
        "/ui/breakglass",
        {"agent": AGENT, "scopes": "deploy:admin", "justification": "x" * 30, "minutes": "5"},
    )
    assert r.status_code == 403
    assert "role_required" in r.text
    # The granter ends it; nobody can review their own.
    await admin.get(f"/ui/breakglass/{bg_id}")
    r = await admin.post(f"/ui/breakglass/{bg_id}/end", {"reason": "incident over"})
    assert r.status_code == 303
    page = await rev.get("/ui/breakglass")
    assert bg_id in page.text
    page = await rev.get(f"/ui/breakglass/{bg_id}")
    assert 'id="signoff"' in page.text
    r = await rev.post(f"/ui/breakglass/{bg_id}/review", {"note": "checked: only the wipe ran"})
    assert r.status_code == 303
    bg = await live.services.breakglass.get(bg_id)
    assert (bg.reviewed_by, bg.ended_by) == ("frank", "erin")


async def test_task_and_audit_views_filter(live: Live) -> None:
    await add_people(live)
    _, task_id, _ = await held(live)
    b = Browser(live)
    await b.sign_in("frank")
    r = await b.get("/ui/tasks?agent=" + AGENT)
    assert r.status_code == 200
    assert task_id in r.text
    r = await b.get("/ui/tasks?owner=nobody")
    assert task_id not in r.text
    r = await b.get("/ui/tasks?state=bogus")
    assert r.status_code == 400
    r = await b.get(f"/ui/tasks/{task_id}")
    assert r.status_code == 200
    assert "approval.requested" in r.text
    r = await b.get("/ui/audit?decision=approval_required")
    assert "approval.requested" in r.text
    r = await b.get("/ui/audit?decision=allow&owner=nobody")
    assert "No record matches." in r.text
    # An approver without oversight roles does not see the audit.
    c = Browser(live)
    await c.sign_in("carol")
    assert (await c.get("/ui/audit")).status_code == 403


async def test_next_never_leaves_the_ui(live: Live) -> None:
    await add_people(live)
    for target in ("https://evil.example/", "//evil.example/x", "/v1/admin/owners", "/ui\\x"):
        b = Browser(live)
        await b.get("/ui/login")
        r = await b.post("/ui/login", {"owner": "carol", "password": PASSWORD, "next": target})
        assert r.headers["location"] == "/ui/", target


async def test_anyone_signed_in_can_sign_out_and_sign_in_replaces_the_session(
    live: Live,
) -> None:
    await add_people(live)
    g = Browser(live)
    await g.sign_in("gus")  # no role: no page, but signing out works
    first = g.cookies["__Host-tb_session"]
    page = await g.get("/ui/approvals")
    assert page.status_code == 403
    await g.sign_in("gus")
    assert g.cookies["__Host-tb_session"] != first
    stale = Browser(live, cookies={"__Host-tb_session": first})
    assert (await stale.get("/ui/approvals")).status_code == 303  # the old one is gone
    await g.get("/ui/approvals")
    r = await g.post("/ui/logout", {})
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?done=signed-out"
