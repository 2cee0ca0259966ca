"""Identity trust material over I/O: JWK Sets from files or URLs, and OIDC discovery.

The adapter half of workload identity (DESIGN.md §3.2): :mod:`taskbound.core.identity`
verifies tokens against a :class:`~taskbound.core.keys.KeyRing`; this module loads and
refreshes those rings. Responses are size-capped and time-limited, redirects are not
followed, and every failure on the request path is an
:class:`~taskbound.errors.IdentityProviderUnavailable` whose ``internal`` says what went wrong. A
source whose material cannot be refreshed fails closed (DESIGN.md invariant 1) unless the
operator grants a ``stale_grace``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from taskbound.core.keys import KeyRing
from taskbound.errors import IdentityProviderUnavailable

__all__ = ["MAX_RESPONSE_BYTES", "JwksSource", "discover_oidc_jwks_uri"]

#: The largest JWKS or discovery document accepted (256 KiB).
MAX_RESPONSE_BYTES: Final = 256 * 1024
_DEFAULT_TIME_LIMIT: Final = 5.0
_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"


async def _get_json(http: httpx.AsyncClient, url: str, *, time_limit: float, what: str) -> Any:
    """GET ``url`` and parse JSON, reading at most :data:`MAX_RESPONSE_BYTES` within
    ``time_limit`` seconds in total (httpx's own timeouts are per phase, so a server that
    trickles bytes would otherwise hold the request open)."""
    try:
        async with asyncio.timeout(time_limit):
            body = await _fetch(http, url, time_limit=time_limit, what=what)
    except TimeoutError:
        raise IdentityProviderUnavailable(internal=f"{what} {url}: timed out") from None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise IdentityProviderUnavailable(internal=f"{what} {url}: not JSON") from None


async def _fetch(http: httpx.AsyncClient, url: str, *, time_limit: float, what: str) -> bytes:
    try:
        async with http.stream(
            "GET",
            url,
            timeout=time_limit,
            follow_redirects=False,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status_code != httpx.codes.OK:
                raise IdentityProviderUnavailable(
                    internal=f"{what} {url}: HTTP {response.status_code}"
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
                raise IdentityProviderUnavailable(internal=f"{what} {url}: response too large")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise IdentityProviderUnavailable(internal=f"{what} {url}: response too large")
    except httpx.HTTPError as exc:
        raise IdentityProviderUnavailable(internal=f"{what} {url}: {type(exc).__name__}") from None
    return bytes(body)


def _read_capped(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_RESPONSE_BYTES + 1)
    if len(data) > MAX_RESPONSE_BYTES:
        raise IdentityProviderUnavailable(internal=f"jwks file {path}: too large")
    return data


def _keyring(document: Any, location: str) -> KeyRing:
    try:
        return KeyRing.from_jwks(document)
    except ValueError as exc:
        raise IdentityProviderUnavailable(internal=f"jwks {location}: {exc}") from None


class JwksSource:
    """A JWK Set (RFC 7517 §5) from a file or a URL, cached as a :class:`KeyRing`.

    :meth:`keyring` reloads the set once it is older than ``max_age``. When a token names a
    ``kid`` the ring does not hold, :meth:`refresh_for_unknown_kid` refetches at most once per
    ``min_refresh`` (so a stream of tokens with made-up ``kid`` values cannot turn the
    broker into a load generator against the issuer).
    """

    def __init__(
        self,
        load: Callable[[], Awaitable[KeyRing]],
        *,
        location: str,
        min_refresh: timedelta,
        max_age: timedelta,
        stale_grace: timedelta = timedelta(0),
    ) -> None:
        if min_refresh < timedelta(0) or max_age <= timedelta(0) or stale_grace < timedelta(0):
            raise ValueError("min_refresh and stale_grace must be >= 0, max_age > 0")
        self._load = load
        self.location = location
        self._min_refresh = min_refresh
        self._max_age = max_age
        self._stale_grace = stale_grace
        self._ring: KeyRing | None = None
        self._loaded_at: datetime | None = None
        self._attempted_at: datetime | None = None
        self._lock = asyncio.Lock()
        #: The internal reason of the last failed load, for operators; ``None`` after success.
        self.last_error: str | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        min_refresh: timedelta = timedelta(seconds=1),
        max_age: timedelta = timedelta(minutes=5),
    ) -> JwksSource:
        """A JWK Set in a local file (for example a SPIFFE bundle written by an agent),
        re-read every ``max_age`` so that a rotated bundle is picked up."""
        file = Path(path)

        async def load() -> KeyRing:
            try:
                data = await asyncio.to_thread(_read_capped, file)
                document = json.loads(data)
            except OSError as exc:
                raise IdentityProviderUnavailable(
                    internal=f"jwks file {file}: {type(exc).__name__}"
                ) from None
            except (ValueError, RecursionError):
                raise IdentityProviderUnavailable(internal=f"jwks file {file}: not JSON") from None
            return _keyring(document, str(file))

        return cls(load, location=str(file), min_refresh=min_refresh, max_age=max_age)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        http: httpx.AsyncClient,
        min_refresh: timedelta,
        max_age: timedelta,
        stale_grace: timedelta = timedelta(0),
        time_limit: float = _DEFAULT_TIME_LIMIT,
    ) -> JwksSource:
        """A JWK Set served at ``url`` (a JWKS URI, RFC 8414 §2 / OIDC Discovery §3, or a
        SPIFFE bundle endpoint). ``stale_grace`` lets the last good set be used for that
        long past ``max_age`` while the URL is failing; the default is to fail closed."""

        async def load() -> KeyRing:
            document = await _get_json(http, url, time_limit=time_limit, what="jwks")
            return _keyring(document, url)

        return cls(
            load,
            location=url,
            min_refresh=min_refresh,
            max_age=max_age,
            stale_grace=stale_grace,
        )

    def _fresh(self, now: datetime, limit: timedelta) -> KeyRing | None:
        if self._ring is None or self._loaded_at is None or now - self._loaded_at >= limit:
            return None
        return self._ring

    async def _reload(self, now: datetime) -> KeyRing:
        self._attempted_at = now
        try:
            ring = await self._load()
        except IdentityProviderUnavailable as exc:
            self.last_error = exc.internal
            raise
        self._ring, self._loaded_at, self.last_error = ring, now, None
        return ring

    async def keyring(self, *, now: datetime) -> KeyRing:
        """The current ring, reloaded when older than ``max_age``.

        Raises :class:`~taskbound.errors.IdentityProviderUnavailable` when no usable ring exists.
        """
        ring = self._fresh(now, self._max_age)
        if ring is not None:
            return ring
        async with self._lock:
            ring = self._fresh(now, self._max_age)
            if ring is not None:
                return ring
            recently_failed = (
                self.last_error is not None
                and self._attempted_at is not None
                and now - self._attempted_at < self._min_refresh
            )
            if not recently_failed:
                try:
                    return await self._reload(now)
                except IdentityProviderUnavailable:
                    pass
            stale = self._fresh(now, self._max_age + self._stale_grace)
            if stale is not None:
                return stale
            raise IdentityProviderUnavailable(
                internal=self.last_error or f"jwks {self.location}: unavailable"
            )

    async def refresh_for_unknown_kid(self, *, now: datetime) -> bool:
        """Refetch because a token named a ``kid`` the ring lacks; at most once per
        ``min_refresh``. ``True`` when a new ring was loaded, ``False`` when rate-limited or
        the load failed (the previous ring stays in use)."""
        async with self._lock:
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh:
                return False
            try:
                await self._reload(now)
            except IdentityProviderUnavailable:
                return False
            return True


@dataclass(frozen=True, slots=True)
class OidcEndpoints:
    """What an OpenID provider's discovery document says, checked."""

    authorization_endpoint: str | None
    token_endpoint: str | None
    jwks_uri: str


def _endpoint(document: Mapping[str, Any], name: str, issuer: str, url: str) -> str | None:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        return None
    allowed = {"https", "http"} if urlsplit(issuer).scheme == "http" else {"https"}
    if urlsplit(value).scheme not in allowed or not urlsplit(value).netloc:
        raise IdentityProviderUnavailable(internal=f"openid-configuration {url}: {name} not https")
    return value


async def discover_oidc(
    issuer: str, http: httpx.AsyncClient, *, time_limit: float = _DEFAULT_TIME_LIMIT
) -> OidcEndpoints:
    """The endpoints of an OIDC issuer (OpenID Connect Discovery 1.0 §4).

    Fetches ``{issuer}/.well-known/openid-configuration`` (trailing ``/`` of the issuer
    removed, §4.1), requires the document's ``issuer`` to equal ``issuer`` exactly (§4.3,
    against issuer mix-up) and every endpoint to be an absolute https URL (http only when
    the issuer itself is http, i.e. a development setup), ``jwks_uri`` required. Raises
    :class:`~taskbound.errors.IdentityProviderUnavailable` on any failure.
    """
    url = issuer.rstrip("/") + _DISCOVERY_PATH
    document = await _get_json(http, url, time_limit=time_limit, what="openid-configuration")
    if not isinstance(document, dict):
        raise IdentityProviderUnavailable(internal=f"openid-configuration {url}: not a JSON object")
    if document.get("issuer") != issuer:
        raise IdentityProviderUnavailable(internal=f"openid-configuration {url}: issuer mismatch")
    jwks_uri = _endpoint(document, "jwks_uri", issuer, url)
    if jwks_uri is None:
        raise IdentityProviderUnavailable(internal=f"openid-configuration {url}: no jwks_uri")
    return OidcEndpoints(
        authorization_endpoint=_endpoint(document, "authorization_endpoint", issuer, url),
        token_endpoint=_endpoint(document, "token_endpoint", issuer, url),
        jwks_uri=jwks_uri,
    )


async def discover_oidc_jwks_uri(
    issuer: str, http: httpx.AsyncClient, *, time_limit: float = _DEFAULT_TIME_LIMIT
) -> str:
    """The ``jwks_uri`` of an OIDC issuer, as :func:`discover_oidc` checks it."""
    return (await discover_oidc(issuer, http, time_limit=time_limit)).jwks_uri
