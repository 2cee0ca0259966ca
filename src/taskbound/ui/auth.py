"""Sign-in for the web UI (docs/ui.md): who is the person behind a request?

* Local passwords (single-node use): Argon2id hashes (``argon2-cffi``, RFC 9106 parameters),
  set by ``taskbound ui set-password``; a failed sign-in costs the same time whether the
  owner exists or not, and repeated failures per owner and per client address are refused
  for a while (``ui.max_failed_signins`` in ``ui.failed_signin_window_seconds``).
* OpenID Connect (production): authorization code flow with PKCE and a nonce; the flow's
  state travels in a cookie sealed with the KEK (AES-GCM), so any replica can finish it.
  The ID token is verified by :func:`taskbound.core.signin.verify_id_token` with the keys of
  the provider's JWK Set; the person is the owner whose id or contact equals the configured
  claim exactly.
* Sessions are server-side (``ui_sessions``): the cookie holds a random token, the store its
  SHA-256; each session has its own anti-forgery token. Cookies are ``HttpOnly``,
  ``SameSite=Lax``, ``Secure`` with the ``__Host-`` prefix (``ui.secure_cookies``).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final
from urllib.parse import urlencode

import httpx
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from taskbound.config import OidcConfig, Settings
from taskbound.core.model import AuditEvent, Owner, UiSession
from taskbound.core.signin import (
    MAX_PASSWORD,
    SignInRejected,
    new_token,
    pkce_pair,
    token_hash,
    verify_id_token,
)
from taskbound.errors import (
    DecryptionFailed,
    IdentityProviderUnavailable,
    TaskboundError,
)
from taskbound.service.runtime import Services
from taskbound.service.trust import JwksSource, OidcEndpoints, discover_oidc

log = logging.getLogger("taskbound.ui")

#: How long a person may take at the identity provider.
OIDC_FLOW_TTL: Final = 600
_OIDC_AAD: Final = b"taskbound-ui-oidc-flow-v1"


class SignInFailed(TaskboundError):
    code = "signin_failed"
    status = 401
    default_detail = "the owner id or password is wrong"


class TooManyAttempts(TaskboundError):
    code = "too_many_attempts"
    status = 429
    default_detail = "too many failed sign-ins; wait a few minutes and try again"


class NotSignedIn(TaskboundError):
    code = "not_signed_in"
    status = 401
    default_detail = "please sign in"


class CsrfFailed(TaskboundError):
    code = "csrf_failed"
    status = 403
    default_detail = "the form has expired or did not come from this site; reload and retry"


@dataclass(frozen=True, slots=True)
class Person:
    """A signed-in person: the owner they are and their session."""

    owner: Owner
    session: UiSession


class Cookies:
    """The UI's cookie names and attributes."""

    def __init__(self, secure: bool) -> None:
        self.secure = secure
        prefix = "__Host-" if secure else ""
        self.session = f"{prefix}tb_session"
        self.login = f"{prefix}tb_login"
        self.oidc = f"{prefix}tb_oidc"

    def attributes(self, max_age: int | None) -> dict[str, Any]:
        return {
            "max_age": max_age,
            "path": "/",
            "secure": self.secure,
            "httponly": True,
            "samesite": "lax",
        }


class Throttle:
    """Failed sign-ins per key (owner id, client address) in a sliding window. Process
    local: with several replicas the bound is per replica (documented)."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        seen = self._failures.get(key)
        if seen is None:
            return deque()
        while seen and seen[0] <= now - self._window:
            seen.popleft()
        if not seen:
            del self._failures[key]
        return seen

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        return any(len(self._recent(k, now)) >= self._limit for k in keys)

    def fail(self, *keys: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= self._max_keys:
            # Forget the quietest half rather than grow without bound.
            for key in sorted(self._failures, key=lambda k: self._failures[k][-1])[
                : self._max_keys // 2
            ]:
                del self._failures[key]
        for key in keys:
            self._failures.setdefault(key, deque()).append(now)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)


class Authenticator:
    """Passwords, OIDC and sessions for one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ui = settings.ui
        self.cookies = Cookies(ui.secure_cookies)
        self.hasher = PasswordHasher()
        self._decoy: str | None = None
        self.throttle = Throttle(ui.max_failed_signins, ui.failed_signin_window_seconds)
        self._oidc_endpoints: OidcEndpoints | None = None
        self._oidc_keys: JwksSource | None = None

    # --- sessions ------------------------------------------------------------------------

    async def person(self, services: Services, token: str | None) -> Person | None:
        if not token or len(token) > 128:
            return None
        session = await services.storage.get_session(token_hash(token), services.clock.now())
        if session is None:
            return None
        owner = await services.storage.get_owner(session.owner_id)
        if owner is None or owner.disabled:
            return None
        return Person(owner, session)

    async def start_session(self, services: Services, owner: Owner, method: str) -> str:
        """A new session for ``owner``; the cookie value."""
        token = new_token()
        now = services.clock.now()
        await services.storage.create_session(
            UiSession(
                id_hash=token_hash(token),
                owner_id=owner.id,
                method=method,
                csrf=new_token(),
                created_at=now,
                expires_at=now + timedelta(seconds=self.settings.ui.session_ttl_seconds),
            )
        )
        await self.audit(services, "ui.signin", "allow", None, owner.id, f"signed in ({method})")
        return token

    async def audit(
        self,
        services: Services,
        event: str,
        decision: str,
        code: str | None,
        owner: str | None,
        detail: str,
    ) -> None:
        await services.storage.append_audit(
            AuditEvent(
                time=services.clock.now(),
                event=event,
                decision=decision,
                code=code,
                owner=owner,
                detail=detail,
            )
        )

    # --- local passwords -----------------------------------------------------------------

    def hash_password(self, password: str) -> str:
        return self.hasher.hash(password)

    async def check_password(
        self, services: Services, owner_id: str, password: str, client: str
    ) -> Owner:
        """The owner, if ``password`` is theirs; :class:`SignInFailed` otherwise (audited;
        the same answer whatever was wrong)."""
        owner_key, client_key = f"owner:{owner_id[:256]}", f"client:{client}"
        if self.throttle.blocked(owner_key, client_key):
            await self.audit(
                services,
                "ui.signin",
                "deny",
                TooManyAttempts.code,
                owner_id[:256] or None,
                f"password sign-in refused: too many failures (client {client})",
            )
            raise TooManyAttempts()
        owner = await services.storage.get_owner(owner_id) if 0 < len(owner_id) <= 256 else None
        stored = await services.storage.get_owner_password(owner_id) if owner else None
        if self._decoy is None:
            # Verified against when the owner has no password: the same work either way.
            # Made on first use, not at start-up (hashing is deliberately slow).
            self._decoy = self.hasher.hash(secrets.token_urlsafe(16))
        ok = False
        try:
            ok = self.hasher.verify(stored or self._decoy, password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok or owner is None or stored is None or owner.disabled:
            self.throttle.fail(owner_key, client_key)
            why = "unknown owner or no password" if stored is None else "wrong password"
            if owner is not None and owner.disabled:
                why = "owner disabled"
            await self.audit(
                services,
                "ui.signin",
                "deny",
                SignInFailed.code,
                owner_id[:256] or None,
                f"password sign-in failed: {why} (client {client})",
            )
            raise SignInFailed()
        self.throttle.clear(owner_key)
        if self.hasher.check_needs_rehash(stored):
            await services.storage.set_owner_password(
                owner.id, self.hasher.hash(password), services.clock.now()
            )
        return owner

    # --- OpenID Connect ------------------------------------------------------------------

    @property
    def oidc(self) -> OidcConfig | None:
        return self.settings.ui.oidc

    async def _endpoints(self, services: Services) -> OidcEndpoints:
        if self._oidc_endpoints is None:
            assert self.oidc is not None
            found = await discover_oidc(self.oidc.issuer, services.http)
            if found.authorization_endpoint is None or found.token_endpoint is None:
                raise IdentityProviderUnavailable(
                    internal="the OIDC provider has no authorization or token endpoint"
                )
            self._oidc_endpoints = found
            ident = self.settings.identity
            self._oidc_keys = JwksSource.from_url(
                found.jwks_uri,
                http=services.http,
                min_refresh=timedelta(seconds=ident.jwks_min_refresh_seconds),
                max_age=timedelta(seconds=ident.jwks_refresh_seconds),
            )
        return self._oidc_endpoints

    def _redirect_uri(self) -> str:
        return self.settings.public_url + "/ui/oidc/callback"

    async def oidc_start(self, services: Services, next_path: str) -> tuple[str, str]:
        """Where to send the browser, and the sealed flow cookie value."""
        assert self.oidc is not None
        endpoints = await self._endpoints(services)
        assert endpoints.authorization_endpoint is not None
        verifier, challenge = pkce_pair()
        flow = {
            "state": new_token(),
            "nonce": new_token(),
            "verifier": verifier,
            "next": next_path,
            "exp": int(services.clock.now().timestamp()) + OIDC_FLOW_TTL,
        }
        sealed = services.box.encrypt(json.dumps(flow).encode(), aad=_OIDC_AAD)
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.oidc.client_id,
                "redirect_uri": self._redirect_uri(),
                "scope": " ".join(self.oidc.scopes),
                "state": flow["state"],
                "nonce": flow["nonce"],
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        sep = "&" if "?" in endpoints.authorization_endpoint else "?"
        cookie = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
        return f"{endpoints.authorization_endpoint}{sep}{query}", cookie

    async def oidc_finish(
        self, services: Services, cookie: str | None, code: str, state: str
    ) -> tuple[Owner, str]:
        """The owner the provider vouches for, and where to go next; :class:`SignInFailed`
        for anything wrong (audited), IdentityProviderUnavailable when it cannot answer."""
        oidc = self.oidc
        assert oidc is not None

        async def fail(why: str, owner: str | None = None) -> SignInFailed:
            await self.audit(
                services, "ui.signin", "deny", SignInFailed.code, owner, f"OIDC sign-in: {why}"
            )
            return SignInFailed("the sign-in with your identity provider did not succeed")

        try:
            padded = (cookie or "") + "=" * (-len(cookie or "") % 4)
            flow = json.loads(services.box.decrypt(base64.urlsafe_b64decode(padded), aad=_OIDC_AAD))
        except (DecryptionFailed, ValueError, TypeError):
            raise await fail("missing or forged flow cookie") from None
        if not isinstance(flow, dict) or not secrets.compare_digest(
            str(flow.get("state", "")), state
        ):
            raise await fail("state mismatch")
        if int(flow.get("exp", 0)) < services.clock.now().timestamp():
            raise await fail("the flow took too long")
        endpoints = await self._endpoints(services)
        assert endpoints.token_endpoint is not None
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri(),
            "client_id": oidc.client_id,
            "code_verifier": str(flow["verifier"]),
        }
        if oidc.client_secret is not None:
            form["client_secret"] = oidc.client_secret.get_secret_value()
        try:
            answer = await services.http.post(
                endpoints.token_endpoint,
                data=form,
                headers={"Accept": "application/json"},
                timeout=oidc.timeout_seconds,
            )
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable(internal=f"OIDC token endpoint: {exc!r}") from None
        if answer.status_code != 200 or len(answer.content) > 65_536:
            raise await fail(f"token endpoint answered {answer.status_code}")
        try:
            id_token = answer.json()["id_token"]
        except (ValueError, KeyError, TypeError):
            raise await fail("no id_token in the token response") from None
        if not isinstance(id_token, str):
            raise await fail("id_token is not a string")
        assert self._oidc_keys is not None
        leeway = timedelta(seconds=self.settings.credentials.clock_leeway_seconds)

        async def verify() -> Any:
            assert self._oidc_keys is not None
            ring = await self._oidc_keys.keyring(now=services.clock.now())
            return verify_id_token(
                id_token,
                issuer=oidc.issuer,
                client_id=oidc.client_id,
                nonce=str(flow["nonce"]),
                keys=ring,
                algorithms=oidc.algorithms,
                name_claim=oidc.owner_claim,
                now=services.clock.now(),
                leeway=leeway,
            )

        try:
            try:
                person = await verify()
            except SignInRejected:
                # A rotated provider key: refetch the set once (rate-limited), then retry.
                if not await self._oidc_keys.refresh_for_unknown_kid(now=services.clock.now()):
                    raise
                person = await verify()
        except SignInRejected as exc:
            raise await fail(f"ID token rejected: {exc.reason}") from None
        owner = await self._owner_named(services, person.name)
        if owner is None:
            raise await fail(f"no enabled owner has {oidc.owner_field} {person.name!r}")
        return owner, str(flow.get("next") or "/ui/")

    async def _owner_named(self, services: Services, name: str) -> Owner | None:
        assert self.oidc is not None
        if self.oidc.owner_field == "id":
            owner = await services.storage.get_owner(name)
        else:
            matches = [o for o in await services.storage.list_owners() if o.contact == name]
            owner = matches[0] if len(matches) == 1 else None
        return None if owner is None or owner.disabled else owner
