"""The web UI end to end in a real browser: Debian's headless Chromium driven by Playwright
(async API, in the test's event loop with the live server), on SQLite and on PostgreSQL.

An agent's real call is held at the gateway (default policy pack); a person signs in
through the login form, finds it in the inbox, sees exactly the call's arguments and
approves or denies it with the page's buttons; the agent's retry goes through once, and
a deny with its reason reaches the agent. An admin grants a break-glass exception on the
page, it expires by the (fake) clock without anyone ending it, lands in the review queue
and a reviewer signs it off. The task and audit views are visited too.

The approval flows run with JavaScript turned off (the UI has no scripts; its CSP allows
none); the break-glass flow runs with it on and checks the console for CSP violations.
A screenshot of every page is kept under ``$TASKBOUND_TEST_ARTIFACTS`` (default
``test-artifacts/ui/<backend>/``).

Skipped when Chromium or Playwright is missing, failed instead with
``TASKBOUND_REQUIRE_SERVICES=1``. No browser is ever downloaded: Playwright launches
``/usr/bin/chromium``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from taskbound.core.clock import FakeClock
from tests.api.conftest import AGENT, Live, free_port, make_settings, start_live
from tests.gateway.conftest import Echo, World, echo_app, serve
from tests.gateway.test_approvals import approval_registry, delete, held, poll, put
from tests.services import _unavailable, postgres_url
from tests.storage.conftest import postgres_schema
from tests.ui.conftest import PASSWORD, add_people

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Page, Response

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # reported by the `browser` fixture (skip, or fail when required)
    async_playwright = None  # type: ignore[assignment]
    expect = None  # type: ignore[assignment]

# Every test of this module, its fixtures and the one browser share the module's loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TASKBOUND_TEST_ARTIFACTS") or REPO / "test-artifacts" / "ui")
#: Markup in a held call's body: the approver must see it as text, never as an element.
MARKUP = "<img src=x onerror=alert(1)><b>bold</b>"
JUSTIFICATION = "incident 4711: wipe the spam flood on acme/web before it spreads"


def chromium_path() -> str:
    """Debian's Chromium, or skip (fail when services are required)."""
    if async_playwright is None:
        _unavailable("the playwright package is not installed (pip install playwright)")
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found is None:
        _unavailable(f"no Chromium at {CHROMIUM} or on PATH (apt-get install chromium)")
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module; every person gets their own context."""
    executable = chromium_path()
    expect.set_options(timeout=TIMEOUT_MS)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class UiWorld:
    """A live server on one backend with a real echo upstream behind its gateway, and the
    people of tests/ui/conftest.py signed up with passwords."""

    backend: str
    world: World
    shots: Path

    @property
    def live(self) -> Live:
        return self.world.live

    @property
    def echo(self) -> Echo:
        return self.world.echo


def ui_registry(echo_base: str, gateway_base: str) -> dict[str, Any]:
    """The gateway approval tests' `issues` tool (with the destructive `merge`) and an agent
    whose ceiling stops at write: `issues:admin` is beyond it, for break-glass."""
    doc = approval_registry(echo_base, "http://127.0.0.1:9/unused", gateway_base)
    doc["owners"] = [o for o in doc["owners"] if o["id"] == "alice"]  # the rest: add_people
    doc["tools"] = [t for t in doc["tools"] if t["id"] == "issues"]
    doc["agents"][0]["ceiling"] = [
        {"tool": "issues", "tier": "read"},
        {"tool": "issues", "tier": "write"},
    ]
    return doc


@pytest_asyncio.fixture(
    loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[UiWorld]:
    backend = str(request.param)
    with contextlib.ExitStack() as stack:
        if backend == "postgres":
            url = stack.enter_context(postgres_schema(postgres_url()))
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
        echo = Echo(f"http://127.0.0.1:{free_port()}")
        upstream, upstream_task = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))
        try:
            # The revocation feed's freshness is real time (5 s by default) and is not what
            # is under test: a loaded machine (Argon2, Chromium) must not make it stale.
            settings = make_settings(
                tmp_path, storage={"url": url}, revocation={"staleness_bound_seconds": 120}
            )
            async for live in start_live(settings, clock, registry=False):
                r = await live.http.post(
                    "/v1/admin/apply", json=ui_registry(echo.base, live.base), headers=live.admin
                )
                assert r.status_code == 200, r.text
                await add_people(live)
                shots = ARTIFACTS / backend
                shots.mkdir(parents=True, exist_ok=True)
                yield UiWorld(backend, World(live, echo, []), shots)
        finally:
            upstream.should_exit = True
            await upstream_task


# --- the browser side -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def person(
    browser: Browser, world: UiWorld, *, javascript: bool = False
) -> AsyncIterator[Page]:
    """A fresh browser profile (no cookies) on the UI. On a clean exit, nothing may have
    failed to load and the console must be free of errors (a CSP violation is one)."""
    context = await browser.new_context(
        base_url=world.live.base,
        java_script_enabled=javascript,
        viewport={"width": 1280, "height": 800},
    )
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        # A CSP violation, say. Error statuses are the `response` check's (below): pages
        # answered with one are the tests' to check, and Chromium's own request for
        # /favicon.ico (outside /ui/, none is served) is not the UI's.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"{message.text} at {message.location['url']}")

    def response(answer: Response) -> None:
        if answer.status >= 400 and answer.request.resource_type != "document":
            problems.append(f"{answer.url}: {answer.status}")

    page = await context.new_page()
    page.on("console", console)
    page.on("response", response)
    page.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))
    try:
        yield page
    finally:
        await context.close()
    assert problems == []


def url_of(world: UiWorld, path: str) -> re.Pattern[str]:
    """The page at ``path`` exactly (any query)."""
    return re.compile(re.escape(world.live.base + path) + r"(\?.*)?$")


async def shoot(page: Page, world: UiWorld, name: str) -> Path:
    """A full-page screenshot kept as a test artefact (fresh: the old one is removed)."""
    path = world.shots / f"{name}.png"
    path.unlink(missing_ok=True)
    await page.screenshot(path=str(path), full_page=True)
    assert path.is_file()
    assert path.stat().st_size > 0
    return path


async def sign_in(
    page: Page, world: UiWorld, who: str, start: str, *, shot: str | None = None
) -> None:
    """Open ``start`` signed out, get sent to the login form, sign in, and land on it."""
    await page.goto(start)
    await expect(page).to_have_url(url_of(world, "/ui/login"))
    await expect(page.locator("h1")).to_have_text("Sign in")
    await page.get_by_label("Owner id").fill(who)
    await page.get_by_label("Password").fill(PASSWORD)
    if shot:
        await shoot(page, world, shot)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(world.live.base + start)
    await expect(page.locator("header .whoami")).to_contain_text(who)


async def sign_out(page: Page, world: UiWorld) -> None:
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(world.live.base + "/ui/login?done=signed-out")
    await expect(page.get_by_role("status")).to_have_text("You are signed out.")
    await expect(page.locator("header .whoami")).to_have_count(0)


async def json_of(page: Page, selector: str) -> Any:
    return json.loads(await page.locator(selector).inner_text())


# --- the tests ---------------------------------------------------------------------------


async def test_an_approver_sees_the_exact_call_in_the_browser_and_it_goes_through_once(
    browser: Browser, world: UiWorld
) -> None:
    agent, t = await world.world.task(("issues", "write"))
    task_id, token = t["task"]["id"], t["creds"]["issues:write"]
    body = {"method": "squash", "commit_title": MARKUP}
    approval = held(await put(world.world, agent, token, body))
    assert world.echo.seen == []

    async with person(browser, world) as page:  # JavaScript off
        # carol approves: not the agent's owner (alice), and an approver.
        await sign_in(page, world, "carol", "/ui/approvals", shot="login")
        href = f'a[href="/ui/approvals/{approval}"]'
        link = page.locator("#pending").locator(href)
        await expect(link).to_have_count(2)  # the time and the call
        row = page.locator("#pending tbody tr", has=page.locator(href))
        await expect(row).to_contain_text("issues.merge")
        await expect(row).to_contain_text(AGENT)
        await expect(row).to_contain_text("0 / 1")
        await shoot(page, world, "inbox")

        await link.last.click()
        await page.wait_for_url(world.live.base + f"/ui/approvals/{approval}")
        await expect(page.locator("#state")).to_have_text("pending")
        await expect(page.locator("#call")).to_have_text("issues.merge")
        await expect(page.locator("#intent")).to_have_text("gateway test")
        await expect(page.locator("#policies")).to_have_text("destructive-needs-approval")
        await expect(page.locator("main")).to_contain_text(AGENT)
        await expect(page.locator("main")).to_contain_text(
            "PUT /issues/repos/acme/web/pulls/7/merge"
        )
        # Exactly the arguments and body the gateway decoded, markup shown as text.
        assert await json_of(page, "#arguments") == {"org": "acme", "repo": "web", "n": "7"}
        assert await json_of(page, "#body") == body
        await expect(page.locator("#body")).to_contain_text(MARKUP)
        await expect(page.locator("main img, main b")).to_have_count(0)
        await shoot(page, world, "approval")

        await page.get_by_role("button", name="Approve this exact call once").click()
        await page.wait_for_url(world.live.base + f"/ui/approvals/{approval}?done=approved")
        await expect(page.get_by_role("status")).to_have_text("Your approval was recorded.")
        await expect(page.locator("#state")).to_have_text("approved")
        await expect(page.locator("#votes")).to_contain_text("carol: approve")
        await expect(page.locator("#approve")).to_have_count(0)  # decided: no form
        await shoot(page, world, "approved")

        # The agent's retry of exactly the same call goes through, once.
        r = await put(world.world, agent, token, body)
        assert r.status_code == 200, r.text
        assert len(world.echo.seen) == 1
        assert json.loads(world.echo.seen[0]["body"]) == body
        again = held(await put(world.world, agent, token, body))
        assert again != approval
        assert len(world.echo.seen) == 1

        await page.reload()
        await expect(page.locator("#state")).to_have_text("consumed")
        await page.goto("/ui/approvals")
        recent = page.locator("#recent tbody tr", has_text="consumed")
        await expect(recent).to_contain_text("carol")
        await expect(page.locator(f'#pending a[href="/ui/approvals/{again}"]')).to_have_count(2)

        # A reviewer looks at the task and the audit trail.
        await sign_out(page, world)
        await sign_in(page, world, "frank", "/ui/tasks")
        await page.locator(f'#tasks a[href="/ui/tasks/{task_id}"]').click()
        await page.wait_for_url(world.live.base + f"/ui/tasks/{task_id}")
        records = page.locator("#records tbody tr")
        allowed = records.filter(has_text="gateway.call").filter(has_text="allow")
        await expect(allowed).to_have_count(1)
        await expect(allowed).to_contain_text(f"approval {approval} consumed")
        await expect(records.filter(has_text="approval.consumed")).to_have_count(1)
        await expect(page.locator("#credentials tbody tr")).to_have_count(1)
        await shoot(page, world, "task")

        await page.get_by_role("link", name="Audit").click()
        await page.wait_for_url(world.live.base + "/ui/audit")
        await page.get_by_label("Decision").select_option("approval_required")
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url(re.compile(r"/ui/audit\?.*decision=approval_required"))
        decisions = page.locator("#records tbody td.decision")
        await expect(decisions.first).to_be_visible()
        for text in await decisions.all_inner_texts():
            assert text.startswith("approval_required"), text
        await expect(page.locator("#records")).to_contain_text(f"held for approval {approval}")
        await shoot(page, world, "audit")


async def test_a_deny_with_a_reason_in_the_browser_reaches_the_agent(
    browser: Browser, world: UiWorld
) -> None:
    agent, t = await world.world.task(("issues", "write"))
    token = t["creds"]["issues:write"]
    approval = held(await put(world.world, agent, token))
    target = f"/ui/approvals/{approval}"

    async with person(browser, world) as page:  # JavaScript off
        # Straight to the approval: the sign-in brings carol back to it.
        await sign_in(page, world, "carol", target)
        await expect(page.locator("#state")).to_have_text("pending")
        assert await json_of(page, "#arguments") == {"org": "acme", "repo": "web", "n": "7"}

        # A deny needs a reason: refused, shown on the page, nothing decided.
        await page.get_by_role("button", name="Deny").click()
        await page.wait_for_url(world.live.base + target)
        await expect(page.locator("#error-code")).to_have_text("reason_required")
        assert (await poll(world.world, agent, approval)).json()["state"] == "pending"

        await page.goto(target)
        await page.get_by_label("Reason").fill("not during the release freeze")
        await page.get_by_role("button", name="Deny").click()
        await page.wait_for_url(world.live.base + target + "?done=denied")
        await expect(page.get_by_role("status")).to_have_text("Your denial was recorded.")
        await expect(page.locator("#state")).to_have_text("denied")
        await expect(page.locator("#votes")).to_contain_text("carol: deny", use_inner_text=True)
        await expect(page.locator("#votes")).to_contain_text("not during the release freeze")
        await expect(page.locator("#approve")).to_have_count(0)
        await shoot(page, world, "denied")

    # The agent polling its approval sees the deny and the reason.
    r = await poll(world.world, agent, approval)
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["reason"]) == ("denied", "not during the release freeze")
    # Its retry is refused: a new approval would be needed, and the upstream saw nothing.
    assert held(await put(world.world, agent, token)) != approval
    assert world.echo.seen == []


async def test_break_glass_granted_expires_into_the_review_queue_and_is_signed_off(
    browser: Browser, world: UiWorld
) -> None:
    # JavaScript on here: the console must stay free of CSP violations all the same.
    async with person(browser, world, javascript=True) as admin:
        await sign_in(admin, world, "erin", "/ui/breakglass")
        grant = admin.locator("#grant")
        await expect(grant).to_be_visible()
        await expect(admin.locator("#active")).to_have_count(0)
        await shoot(admin, world, "breakglass")

        await grant.get_by_label("Agent").select_option(AGENT)
        await grant.get_by_label("Scopes beyond its ceiling").fill("issues:admin")
        await grant.get_by_label("Justification").fill(JUSTIFICATION)
        await grant.get_by_label("Ends after").fill("30")
        await grant.get_by_role("button", name="Grant break-glass").click()
        await admin.wait_for_url(re.compile(r"/ui/breakglass/[^/?]+\?done=granted$"))
        bg_id = admin.url.rsplit("/", 1)[1].split("?", 1)[0]
        await expect(admin.get_by_role("status")).to_have_text(
            "The break-glass exception was granted."
        )
        await expect(admin.locator("#state")).to_have_text("active")
        await expect(admin.locator("#scopes")).to_have_text("issues:admin")
        await expect(admin.locator("#justification")).to_have_text(JUSTIFICATION)
        await expect(admin.locator("#end")).to_be_visible()

        # The agent uses it: a task beyond its ceiling, granted under the exception.
        agent = await world.live.agent()
        r = await agent.start(
            intent={
                "purpose": "wipe the spam flood",
                "constraints": {"org": "acme", "repo": "web", "tiers": ["admin"]},
            },
            scopes=[{"tool": "issues", "tier": "admin"}],
        )
        assert r.status_code == 201, r.text
        task_id = r.json()["id"]
        (credential,) = r.json()["credentials"]
        held(await delete(world.world, agent, credential["access_token"]))  # admin: held
        await admin.reload()
        under = admin.locator("#calls tbody tr", has_text="gateway.call")
        await expect(under).to_have_count(1)
        await expect(under).to_contain_text("approval_required")
        await expect(under).to_contain_text("issues.delete_repo")
        await expect(under).to_contain_text(task_id)
        await shoot(admin, world, "breakglass-active")

        await admin.goto("/ui/breakglass")
        await expect(admin.locator("#active")).to_contain_text(bg_id)
        await expect(admin.locator("#review")).to_have_count(0)

        # Nobody ends it: it expires by the clock and waits for its review.
        world.live.clock.advance(31 * 60)
        await admin.reload()
        await expect(admin.locator("#active")).to_have_count(0)
        await expect(admin.get_by_text("No exception is in force.")).to_be_visible()
        queued = admin.locator("#review tbody tr", has_text=bg_id)
        await expect(queued).to_have_count(1)
        await expect(queued.locator("td.state")).to_have_text("review")
        await expect(queued).to_contain_text("erin")
        await shoot(admin, world, "review-queue")

        # The granter, who is no reviewer, gets no sign-off form (and nothing to end).
        await queued.get_by_role("link").click()
        await admin.wait_for_url(world.live.base + f"/ui/breakglass/{bg_id}")
        await expect(admin.locator("#state")).to_have_text("review")
        await expect(admin.locator("#signoff")).to_have_count(0)
        await expect(admin.locator("#end")).to_have_count(0)

    async with person(browser, world, javascript=True) as reviewer:
        await sign_in(reviewer, world, "frank", "/ui/breakglass")
        await expect(reviewer.locator("#grant")).to_have_count(0)  # reviewers cannot grant
        await reviewer.locator("#review").get_by_role("link", name=bg_id).click()
        await reviewer.wait_for_url(world.live.base + f"/ui/breakglass/{bg_id}")
        await expect(reviewer.locator("#state")).to_have_text("review")
        signoff = reviewer.locator("#signoff")
        await signoff.get_by_label("Review note").fill("checked: one admin task, no calls made")
        await signoff.get_by_role("button", name="Sign off").click()
        await reviewer.wait_for_url(world.live.base + f"/ui/breakglass/{bg_id}?done=reviewed")
        await expect(reviewer.get_by_role("status")).to_have_text("The review was signed off.")
        await expect(reviewer.locator("#state")).to_have_text("reviewed")
        await expect(reviewer.locator("#signoff")).to_have_count(0)
        await expect(reviewer.locator("main")).to_contain_text("by frank at", use_inner_text=True)

        await reviewer.goto("/ui/breakglass")
        await expect(reviewer.locator("#review")).to_have_count(0)
        done = reviewer.locator("#reviewed tbody tr", has_text=bg_id)
        await expect(done).to_have_count(1)
        await expect(done).to_contain_text("frank")
        await shoot(reviewer, world, "reviewed")

    bg = await world.live.services.breakglass.get(bg_id)
    assert (bg.reviewed_by, bg.ended_by, bg.granted_by) == ("frank", None, "erin")
