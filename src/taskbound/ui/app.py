"""The web UI under ``/ui/`` (docs/ui.md): server-rendered pages for people.

Approvals inbox and decisions, break-glass grant / end / review, and the task and audit
views. No front-end build and no JavaScript: every action is a plain HTML form, protected
by the session's anti-forgery token and an ``Origin`` / ``Sec-Fetch-Site`` check. Every
response carries a strict content security policy (no scripts at all), ``no-store``
caching and framing refused.

Each page states the role it needs: any signed-in owner with a role sees the approvals
inbox; deciding needs ``approver`` (checked by the approvals service, with separation of
duties); break-glass pages need ``admin`` or ``reviewer`` (granting needs ``admin``,
signing off ``reviewer``); the task, audit and report views need ``reviewer`` or
``admin``.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from taskbound.api.http import read_form
from taskbound.config import Settings
from taskbound.core.breakglass import label
from taskbound.core.model import ApprovalState, Role, Scope, TaskFilter, TaskState, Tier
from taskbound.core.signin import token_hash
from taskbound.errors import InvalidRequest, NotFound, RoleRequired, TaskboundError
from taskbound.service.report_html import html_headers, install, render_report, report_context
from taskbound.service.report_request import (
    FILTERS,
    KINDS,
    parse_report_request,
    run_report,
)
from taskbound.service.runtime import Services
from taskbound.ui.auth import (
    Authenticator,
    CsrfFailed,
    NotSignedIn,
    Person,
)

__all__ = ["ui_mount"]

log = logging.getLogger("taskbound.ui")

CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: Fixed messages a redirect may show (``?done=``): never text taken from the request.
DONE: Final = {
    "approved": "Your approval was recorded.",
    "denied": "Your denial was recorded.",
    "granted": "The break-glass exception was granted.",
    "ended": "The break-glass exception was ended; what relied on it is revoked.",
    "reviewed": "The review was signed off.",
    "signed-out": "You are signed out.",
}
VIEW_ROLES: Final = frozenset({Role.APPROVER, Role.REVIEWER, Role.ADMIN})
OVERSIGHT: Final = frozenset({Role.REVIEWER, Role.ADMIN})
PAGE_LIMIT: Final = 200
REPORT_KINDS: Final = (
    ("posture", "Posture findings"),
    ("usage", "Granted vs used"),
    ("blast-radius", "Blast radius"),
    ("alignment", "Framework alignment"),
)

Page = Callable[[Request, Person], Awaitable[Response]]


def _at(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def _safe_next(value: str | None) -> str:
    """A post-sign-in destination: only a path of this UI, never another site."""
    if not value or not value.startswith("/ui/") or value.startswith("//"):
        return "/ui/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in value:
        return "/ui/"
    return value[:512]


def ui_mount(settings: Settings, services: Callable[[], Services]) -> Mount:
    """The ``/ui`` routes for this app."""
    auth = Authenticator(settings)
    env = Environment(
        loader=PackageLoader("taskbound.ui", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["at"] = _at
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, ensure_ascii=False)
    install(env)
    public = urlsplit(settings.public_url)
    origin = f"{public.scheme}://{public.netloc}"

    def render(
        request: Request,
        template: str,
        person: Person | None,
        status: int = 200,
        **context: Any,
    ) -> Response:
        body = env.get_template(template).render(
            person=person,
            csrf=person.session.csrf if person else None,
            roles=sorted(r.value for r in person.owner.roles) if person else [],
            done=DONE.get(request.query_params.get("done", "")),
            oidc=settings.ui.oidc is not None,
            local=settings.ui.local_passwords,
            **context,
        )
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    def redirect(url: str) -> Response:
        return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)

    def error_page(request: Request, person: Person | None, err: TaskboundError) -> Response:
        return render(request, "error.html", person, status=err.status, error=err)

    def same_origin(request: Request) -> bool:
        """A state-changing request must come from this site's own pages."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        sent = request.headers.get("origin")
        if sent is None:
            # Browsers send Origin on every POST; a missing one is a non-browser client,
            # which still needs the session's token below.
            return True
        if sent == "null":
            # Under this UI's own "Referrer-Policy: no-referrer" browsers send
            # "Origin: null" even for the forms of its pages: then only the browser's
            # own Fetch metadata (which no page can set) vouches that it is same-origin.
            return request.headers.get("sec-fetch-site") == "same-origin"
        own = f"{request.url.scheme}://{request.url.netloc}"
        return secrets.compare_digest(sent, origin) or secrets.compare_digest(sent, own)

    async def form(request: Request, person: Person | None) -> dict[str, str]:
        """The posted form, after the anti-forgery checks."""
        fields = await read_form(request, max_fields=40)
        if not same_origin(request):
            raise CsrfFailed(internal="cross-site request")
        expected = person.session.csrf if person else request.cookies.get(auth.cookies.login, "")
        if not expected or not secrets.compare_digest(fields.get("csrf", ""), expected):
            raise CsrfFailed(internal="anti-forgery token missing or wrong")
        return fields

    def page(
        path: str,
        *,
        methods: tuple[str, ...] = ("GET",),
        roles: frozenset[Role] | None = VIEW_ROLES,
    ) -> Callable[[Page], Route]:
        """A page for signed-in people with one of ``roles`` (None: any signed-in person)."""

        def wrap(fn: Page) -> Route:
            async def endpoint(request: Request) -> Response:
                svc = services()
                person = await auth.person(svc, request.cookies.get(auth.cookies.session))
                if person is None:
                    if request.method == "GET":
                        target = request.url.path
                        if request.url.query:
                            target += "?" + request.url.query
                        return redirect("/ui/login?" + urlencode({"next": target}))
                    return error_page(request, None, NotSignedIn())
                if roles is not None and not roles & person.owner.roles:
                    need = " or ".join(sorted(r.value for r in roles))
                    return error_page(
                        request, person, RoleRequired(f"this page needs the {need} role")
                    )
                try:
                    return await fn(request, person)
                except TaskboundError as err:
                    log.info(
                        "ui refusal",
                        extra={"path": request.url.path, "code": err.code, "reason": err.internal},
                    )
                    return error_page(request, person, err)
                except Exception:
                    # Not decidable: refused, and the details stay in the log.
                    log.exception("ui page failed", extra={"path": request.url.path})
                    return error_page(request, person, TaskboundError())

            return Route(path, endpoint, methods=list(methods))

        return wrap

    # --- sign-in -------------------------------------------------------------------------

    async def _end_previous(request: Request) -> None:
        """A sign-in never keeps a session the browser had before (no fixation)."""
        old = request.cookies.get(auth.cookies.session)
        if old and len(old) <= 128:
            await services().storage.delete_session(token_hash(old))

    async def login(request: Request) -> Response:
        svc = services()
        next_path = _safe_next(request.query_params.get("next"))
        error: TaskboundError | None = None
        status = 200
        if request.method == "POST":
            try:
                if not settings.ui.local_passwords:
                    raise NotFound("local passwords are turned off")
                fields = await form(request, None)
                next_path = _safe_next(fields.get("next"))
                client = request.client.host if request.client else "unknown"
                owner = await auth.check_password(
                    svc, fields.get("owner", ""), fields.get("password", ""), client
                )
                await _end_previous(request)
                token = await auth.start_session(svc, owner, "password")
                response = redirect(next_path)
                response.set_cookie(
                    auth.cookies.session,
                    token,
                    **auth.cookies.attributes(settings.ui.session_ttl_seconds),
                )
                response.delete_cookie(auth.cookies.login, **_deletion(auth))
                return response
            except TaskboundError as err:
                error, status = err, err.status
        login_token = secrets.token_urlsafe(32)
        response = render(
            request,
            "login.html",
            None,
            status=status,
            error=error,
            next=next_path,
            login_csrf=login_token,
        )
        response.set_cookie(auth.cookies.login, login_token, **auth.cookies.attributes(900))
        return response

    async def oidc_start(request: Request) -> Response:
        if settings.ui.oidc is None:
            return error_page(request, None, NotFound("OIDC sign-in is not configured"))
        try:
            url, flow = await auth.oidc_start(
                services(), _safe_next(request.query_params.get("next"))
            )
        except TaskboundError as err:
            return error_page(request, None, err)
        response = RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(auth.cookies.oidc, flow, **auth.cookies.attributes(600))
        return response

    async def oidc_callback(request: Request) -> Response:
        if settings.ui.oidc is None:
            return error_page(request, None, NotFound("OIDC sign-in is not configured"))
        q = request.query_params
        svc = services()
        try:
            if "error" in q or not q.get("code") or not q.get("state"):
                raise InvalidRequest(
                    "the identity provider did not sign you in",
                    internal=f"OIDC callback error {q.get('error', 'no code')[:100]!r}",
                )
            owner, next_path = await auth.oidc_finish(
                svc, request.cookies.get(auth.cookies.oidc), q["code"][:4096], q["state"][:512]
            )
            await _end_previous(request)
            token = await auth.start_session(svc, owner, "oidc")
        except TaskboundError as err:
            return error_page(request, None, err)
        response = redirect(_safe_next(next_path))
        response.set_cookie(
            auth.cookies.session, token, **auth.cookies.attributes(settings.ui.session_ttl_seconds)
        )
        response.delete_cookie(auth.cookies.oidc, **_deletion(auth))
        return response

    @page("/logout", methods=("POST",), roles=None)
    async def logout(request: Request, person: Person) -> Response:
        await form(request, person)
        svc = services()
        await svc.storage.delete_session(person.session.id_hash)
        await auth.audit(svc, "ui.signout", "info", None, person.owner.id, "signed out")
        response = redirect("/ui/login?done=signed-out")
        response.delete_cookie(auth.cookies.session, **_deletion(auth))
        return response

    async def home(request: Request) -> Response:
        return redirect("/ui/approvals")

    # --- approvals -----------------------------------------------------------------------

    @page("/approvals")
    async def approvals(request: Request, person: Person) -> Response:
        svc = services()
        pending = await svc.approvals.list_approvals(ApprovalState.PENDING, PAGE_LIMIT)
        recent = [
            a
            for a in await svc.approvals.list_approvals(None, 50)
            if a.state_at(svc.clock.now()) is not ApprovalState.PENDING
        ]
        return render(
            request,
            "approvals.html",
            person,
            pending=pending,
            recent=recent,
            now=svc.clock.now(),
        )

    @page("/approvals/{approval_id}", methods=("GET", "POST"))
    async def approval(request: Request, person: Person) -> Response:
        svc = services()
        approval_id = request.path_params["approval_id"]
        if request.method == "POST":
            fields = await form(request, person)
            verdict = fields.get("decision")
            if verdict not in ("approve", "deny"):
                raise InvalidRequest("choose approve or deny")
            await svc.approvals.decide(
                approval_id,
                as_owner=person.owner.id,
                approve=verdict == "approve",
                reason=fields.get("reason", "")[:1000],
                cause=f"ui:{person.owner.id}",
            )
            done = "approved" if verdict == "approve" else "denied"
            return redirect(f"/ui/approvals/{approval_id}?done={done}")
        found = await svc.approvals.get(approval_id)
        votes = await svc.approvals.votes(found.id)
        now = svc.clock.now()
        return render(
            request,
            "approval.html",
            person,
            a=found,
            state=found.state_at(now).value,
            votes=votes,
            summary=dict(found.summary),
            voted=any(v.approver == person.owner.id for v in votes),
        )

    # --- break-glass ---------------------------------------------------------------------

    @page("/breakglass", methods=("GET", "POST"), roles=OVERSIGHT)
    async def breakglass(request: Request, person: Person) -> Response:
        svc = services()
        exceptions = svc.breakglass
        if request.method == "POST":
            fields = await form(request, person)
            scopes = _scopes(fields.get("scopes", ""))
            try:
                minutes = int(fields.get("minutes") or "0")
            except ValueError:
                raise InvalidRequest("the duration must be a whole number of minutes") from None
            expires = None
            if minutes:
                if not 1 <= minutes <= 90 * 24 * 60:
                    raise InvalidRequest("the duration must be 1 minute to 90 days")
                expires = svc.clock.now() + timedelta(minutes=minutes)
            bg = await exceptions.grant(
                agent_id=fields.get("agent", "")[:2048],
                scopes=scopes,
                justification=fields.get("justification", "")[:4000],
                granted_by=person.owner.id,
                expires_at=expires,
                cause=f"ui:{person.owner.id}",
            )
            return redirect(f"/ui/breakglass/{bg.id}?done=granted")
        active = await exceptions.find(state="active")
        review = await exceptions.find(state="review")
        reviewed = await exceptions.find(state="reviewed", limit=20)
        agents = await svc.storage.list_agents()
        return render(
            request,
            "breakglass.html",
            person,
            active=active,
            review=[(bg, exceptions.state_of(bg)) for bg in review],
            reviewed=reviewed,
            agents=[a for a in agents if a.state.value == "active"],
            config=settings.breakglass,
        )

    @page("/breakglass/{bg_id}", roles=OVERSIGHT)
    async def breakglass_one(request: Request, person: Person) -> Response:
        svc = services()
        bg = await svc.breakglass.get(request.path_params["bg_id"])
        calls = await svc.breakglass.calls(bg.id)
        return render(
            request,
            "breakglass_one.html",
            person,
            bg=bg,
            state=svc.breakglass.state_of(bg),
            calls=calls,
            scopes=label(bg.scopes),
        )

    @page("/breakglass/{bg_id}/end", methods=("POST",), roles=OVERSIGHT)
    async def breakglass_end(request: Request, person: Person) -> Response:
        fields = await form(request, person)
        bg_id = request.path_params["bg_id"]
        await services().breakglass.end(
            bg_id,
            by=person.owner.id,
            reason=fields.get("reason", "")[:1000],
            cause=f"ui:{person.owner.id}",
        )
        return redirect(f"/ui/breakglass/{bg_id}?done=ended")

    @page("/breakglass/{bg_id}/review", methods=("POST",), roles=OVERSIGHT)
    async def breakglass_review(request: Request, person: Person) -> Response:
        fields = await form(request, person)
        bg_id = request.path_params["bg_id"]
        await services().breakglass.review(
            bg_id,
            reviewer=person.owner.id,
            note=fields.get("note", "")[:4000],
            cause=f"ui:{person.owner.id}",
        )
        return redirect(f"/ui/breakglass/{bg_id}?done=reviewed")

    # --- tasks and audit -----------------------------------------------------------------

    @page("/tasks", roles=OVERSIGHT)
    async def tasks(request: Request, person: Person) -> Response:
        svc = services()
        q = request.query_params
        state = q.get("state") or None
        if state is not None and state not in {s.value for s in TaskState}:
            raise InvalidRequest("state must be a task state")
        found = await svc.storage.list_tasks(
            TaskFilter(
                agent_id=q.get("agent") or None,
                owner_id=q.get("owner") or None,
                state=TaskState(state) if state else None,
                limit=PAGE_LIMIT,
            )
        )
        now = svc.clock.now()
        return render(
            request,
            "tasks.html",
            person,
            tasks=[(t, t.state_at(now).value) for t in found],
            filters={k: q.get(k, "") for k in ("agent", "owner", "state")},
            states=[s.value for s in TaskState],
        )

    @page("/tasks/{task_id}", roles=OVERSIGHT)
    async def task(request: Request, person: Person) -> Response:
        svc = services()
        found = await svc.storage.get_task(request.path_params["task_id"])
        if found is None:
            raise NotFound("no such task")
        credentials = await svc.storage.list_credentials(found.id)
        calls = await svc.storage.list_audit(task=found.id, limit=PAGE_LIMIT)
        now = svc.clock.now()
        return render(
            request,
            "task.html",
            person,
            t=found,
            state=found.state_at(now).value,
            credentials=[(c, c.live_at(now)) for c in credentials],
            calls=calls,
        )

    @page("/audit", roles=OVERSIGHT)
    async def audit(request: Request, person: Person) -> Response:
        svc = services()
        q = request.query_params
        filters = {k: q.get(k, "")[:2048] for k in ("agent", "task", "owner", "decision")}
        records = await svc.storage.list_audit(
            agent=filters["agent"] or None,
            task=filters["task"] or None,
            owner=filters["owner"] or None,
            decision=filters["decision"] or None,
            descending=True,
            limit=PAGE_LIMIT,
        )
        return render(
            request,
            "audit.html",
            person,
            records=records,
            filters=filters,
            decisions=["allow", "deny", "approval_required", "error", "info"],
        )

    # --- reports (docs/reports.md) ------------------------------------------------------

    @page("/reports", roles=OVERSIGHT)
    async def reports_index(request: Request, person: Person) -> Response:
        return render(
            request, "reports.html", person, kind=None, kinds=REPORT_KINDS, title="Reports"
        )

    @page("/reports/{kind}", roles=OVERSIGHT)
    async def report(request: Request, person: Person) -> Response:
        """One report, with its window and filters as a GET form; ``?format=html`` downloads
        the self-contained HTML report. A report that cannot be made shows why, in place."""
        svc = services()
        kind = request.path_params["kind"]
        if kind not in KINDS:
            raise NotFound("no such report")
        q = request.query_params
        fields = FILTERS[kind]
        filters = {
            k: q.get(k, "")[:2048]
            for k in ("since", "until", "agent", "owner", "task", "credential")
        }
        context: dict[str, Any] = {
            "kind": kind,
            "kinds": REPORT_KINDS,
            "title": dict(REPORT_KINDS)[kind],
            "fields": fields,
            "filters": filters,
            "agents": [],
            "r": None,
            "error": None,
            "download": "",
        }
        if "agent" in fields:
            context["agents"] = [a.spiffe_id for a in await svc.storage.list_agents()]
        given = {k: v for k, v in filters.items() if v}
        status = 200
        try:
            # Blast radius without a subject: the form alone, to name one.
            if kind != "blast-radius" or given:
                asked = parse_report_request(kind, given, svc.clock.now())
                found = await run_report(svc.reports, asked)
                if q.get("format") == "html":
                    headers = html_headers(asked.kind)
                    headers["Content-Disposition"] = headers["Content-Disposition"].replace(
                        "inline", "attachment"
                    )
                    return HTMLResponse(render_report(found), headers=headers)
                context.update(report_context(found))
                context["download"] = f"/ui/reports/{kind}?" + urlencode(
                    {**given, "format": "html"}
                )
        except TaskboundError as err:
            log.info(
                "ui report refused",
                extra={"path": request.url.path, "code": err.code, "reason": err.internal},
            )
            context["error"] = {"code": err.code, "detail": err.detail}
            status = err.status
        return render(request, "reports.html", person, status=status, **context)

    async def report_style(request: Request) -> Response:
        css = env.loader.get_source(env, "report.css")[0] if env.loader else ""
        return Response(
            css,
            media_type="text/css",
            headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"},
        )

    async def style(request: Request) -> Response:
        css = env.loader.get_source(env, "style.css")[0] if env.loader else ""
        return Response(
            css,
            media_type="text/css",
            headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"},
        )

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/login/oidc", oidc_start, methods=["GET"]),
        Route("/oidc/callback", oidc_callback, methods=["GET"]),
        Route("/static/style.css", style, methods=["GET"]),
        Route("/static/report.css", report_style, methods=["GET"]),
        logout,
        approvals,
        approval,
        breakglass,
        breakglass_one,
        breakglass_end,
        breakglass_review,
        tasks,
        task,
        audit,
        reports_index,
        report,
    ]
    return Mount("/ui", routes=routes)


def _deletion(auth: Authenticator) -> dict[str, Any]:
    attrs = auth.cookies.attributes(None)
    return {k: attrs[k] for k in ("path", "secure", "httponly", "samesite")}


def _scopes(text: str) -> list[Scope]:
    """``tool:tier`` items, one per line or separated by spaces or commas."""
    scopes = []
    for item in text.replace(",", " ").split():
        tool, sep, tier = item.partition(":")
        if not sep or not tool or tier not in {t.value for t in Tier}:
            raise InvalidRequest(f"{item[:100]!r} is not tool:tier (read, write or admin)")
        scopes.append(Scope(tool, Tier(tier)))
    if not scopes:
        raise InvalidRequest("name at least one tool:tier scope")
    return scopes
