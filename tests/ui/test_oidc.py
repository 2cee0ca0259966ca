"""OIDC sign-in to the web UI against a real (local) OpenID provider: authorization code
with PKCE and a nonce, the flow state sealed in a cookie, the ID token verified with the
provider's published keys, and every way it can go wrong refused, audited, and without a
session."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from taskbound.core import jws
from taskbound.core.clock import FakeClock, to_epoch
from taskbound.core.keys import PrivateKey, generate_key, public_jwk
from tests.api.conftest import Live, free_port, make_settings, start_live
from tests.gateway.conftest import serve
from tests.ui.conftest import Browser, add_people

CLIENT = "taskbound-ui"


@dataclass
class Provider:
    """A minimal OpenID provider: it signs in whoever ``person`` names, honours PKCE,
    and can be told to misbehave (``tamper``)."""

    base: str
    key: PrivateKey
    clock: FakeClock
    person: dict[str, Any] = field(default_factory=lambda: {"email": "carol@example.com"})
    tamper: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    alg_header: str | None = None

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.base,
                    "authorization_endpoint": self.base + "/authorize",
                    "token_endpoint": self.base + "/token",
                    "jwks_uri": self.base + "/jwks",
                }
            )

        async def jwks(request: Request) -> Response:
            return JSONResponse({"keys": [public_jwk(self.key)]})

        async def authorize(request: Request) -> Response:
            q = request.query_params
            assert q["response_type"] == "code"
            assert q["client_id"] == CLIENT
            assert q["code_challenge_method"] == "S256"
            code = secrets.token_urlsafe(16)
            self.codes[code] = dict(q)
            back = q["redirect_uri"] + "?" + urlencode({"code": code, "state": q["state"]})
            return RedirectResponse(back, status_code=302)

        async def token(request: Request) -> Response:
            form = parse_qs((await request.body()).decode())
            code = form["code"][0]
            asked = self.codes.pop(code, None)
            verifier = form.get("code_verifier", [""])[0]
            challenge = (
                base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                .rstrip(b"=")
                .decode()
            )
            if asked is None or challenge != asked["code_challenge"]:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            now = to_epoch(self.clock.now())
            claims = {
                "iss": self.base,
                "aud": CLIENT,
                "sub": "user-123",
                "iat": now,
                "exp": now + 300,
                "nonce": asked["nonce"],
                "email_verified": True,
                **self.person,
                **self.tamper,
            }
            header = {"alg": self.alg_header or self.key.alg, "kid": self.key.kid}
            if self.alg_header == "none":
                body = base64.urlsafe_b64encode(jws._encode_json(claims)).rstrip(b"=").decode()
                head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
                return JSONResponse({"id_token": f"{head}.{body}."})
            return JSONResponse({"id_token": jws.sign_compact(header, claims, self.key)})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
            ]
        )


@pytest.fixture
async def oidc(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[Live, Provider]]:
    port = free_port()
    provider = Provider(f"http://127.0.0.1:{port}", generate_key("ES256"), clock)
    server, task = await serve(provider.app(), port)
    settings = make_settings(
        tmp_path,
        storage={"url": f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"},
        ui={"oidc": {"issuer": provider.base, "client_id": CLIENT}},
    )
    try:
        async for live in start_live(settings, clock):
            await add_people(live)
            yield live, provider
    finally:
        server.should_exit = True
        await task


async def sign_in(live: Live, b: Browser, next_path: str = "/ui/audit") -> Any:
    """Walk the redirects of the code flow as a browser would; the last response."""
    r = await b.get("/ui/login/oidc?" + urlencode({"next": next_path}))
    assert r.status_code == 303, r.text
    at_idp = r.headers["location"]
    q = parse_qs(urlsplit(at_idp).query)
    assert q["redirect_uri"] == [live.base + "/ui/oidc/callback"]
    assert q["scope"] == ["openid email"]
    assert "nonce" in q
    assert "code_challenge" in q
    raw = next(c for c in r.headers.get_list("set-cookie") if c.startswith("__Host-tb_oidc="))
    assert "Secure" in raw
    assert "HttpOnly" in raw
    async with __import__("httpx").AsyncClient() as idp:
        back = await idp.get(at_idp)
    assert back.status_code == 302
    callback = urlsplit(back.headers["location"])
    return await b.get(callback.path + "?" + callback.query)


async def signins(live: Live) -> list[Any]:
    return [
        e for _, e in await live.services.storage.list_audit(limit=500) if e.event == "ui.signin"
    ]


async def test_code_flow_with_pkce_signs_the_owner_in(oidc: tuple[Live, Provider]) -> None:
    live, _ = oidc
    b = Browser(live)
    r = await sign_in(live, b, "/ui/audit")
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/ui/audit"
    assert "__Host-tb_session" in b.cookies
    assert "__Host-tb_oidc" not in b.cookies
    page = await b.get("/ui/approvals")
    assert page.status_code == 200
    assert "carol" in page.text
    (event,) = await signins(live)
    assert (event.decision, event.owner) == ("allow", "carol")


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        ({"aud": "someone-else"}, "audience mismatch"),
        ({"iss": "https://evil.example"}, "issuer mismatch"),
        ({"nonce": "replayed-from-another-flow"}, "nonce mismatch"),
        ({"exp": 1}, "expired"),
        ({"email": "mallory@example.com"}, "no enabled owner"),
        ({"email_verified": False}, "not verified"),
        ({"aud": [CLIENT, "other"], "azp": "other"}, "azp"),
    ],
)
async def test_a_bad_id_token_signs_nobody_in(
    oidc: tuple[Live, Provider], tamper: dict[str, Any], why: str
) -> None:
    live, provider = oidc
    provider.tamper = tamper
    b = Browser(live)
    r = await sign_in(live, b)
    assert r.status_code == 401
    assert "signin_failed" in r.text
    assert "__Host-tb_session" not in b.cookies
    (event,) = await signins(live)
    assert event.decision == "deny"
    assert why in event.detail


async def test_unsigned_or_foreign_key_tokens_are_refused(oidc: tuple[Live, Provider]) -> None:
    live, provider = oidc
    provider.alg_header = "none"
    r = await sign_in(live, Browser(live))
    assert r.status_code == 401
    provider.alg_header = None
    real = provider.key
    provider.key = generate_key("ES256")  # signs with a key the provider does not publish
    provider.key = type(real)(real.kid, provider.key.alg, provider.key.key)
    r = await sign_in(live, Browser(live))
    assert r.status_code == 401
    assert all(e.decision == "deny" for e in await signins(live))


async def test_the_flow_cookie_binds_the_callback(oidc: tuple[Live, Provider]) -> None:
    live, _ = oidc
    b = Browser(live)
    r = await b.get("/ui/login/oidc")
    at_idp = r.headers["location"]
    async with __import__("httpx").AsyncClient() as idp:
        back = urlsplit((await idp.get(at_idp)).headers["location"])
    # Another browser (no flow cookie), a forged cookie, a swapped state: all refused.
    r = await Browser(live).get(back.path + "?" + back.query)
    assert r.status_code == 401
    forged = Browser(live, cookies={"__Host-tb_oidc": "AAAA" + b.cookies["__Host-tb_oidc"][4:]})
    assert (await forged.get(back.path + "?" + back.query)).status_code == 401
    q = parse_qs(back.query)
    r = await b.get(back.path + "?" + urlencode({"code": q["code"][0], "state": "other"}))
    assert r.status_code == 401
    # ... and a flow that took too long.
    b2 = Browser(live)
    r = await b2.get("/ui/login/oidc")
    async with __import__("httpx").AsyncClient() as idp:
        back = urlsplit((await idp.get(r.headers["location"])).headers["location"])
    live.clock.advance(601)
    assert (await b2.get(back.path + "?" + back.query)).status_code == 401
    # The provider's own error.
    assert (await b2.get("/ui/oidc/callback?error=access_denied")).status_code == 400
    assert not [e for e in await signins(live) if e.decision == "allow"]
