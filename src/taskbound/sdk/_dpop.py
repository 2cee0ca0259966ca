"""The per-task DPoP key (RFC 9449), kept in memory only, and the request signing that
httpx (and the MCP SDK's httpx2) call through ``Auth``.

One key per task: generated when the task starts, never written anywhere, gone with the
process. Each request gets a fresh proof (``jti``, ``iat``, ``htm``, ``htu``, and ``ath``
when a credential rides along). A server that asks for a nonce (``401`` with
``error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header) gets the request once more with
it; nonces a server hands out on any answer are kept per origin and used from then on.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Awaitable, Callable, Generator
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from taskbound.core.dpop import make_dpop_proof, normalize_htu
from taskbound.core.keys import PrivateKey, generate_key, jwk_thumbprint, public_jwk
from taskbound.sdk.errors import TaskboundClientError

__all__ = ["DPoPKey", "TokenAuth", "resent_with_nonce"]


class _Request(Protocol):
    method: str
    headers: Any

    @property
    def url(self) -> Any: ...


class _Response(Protocol):
    status_code: int
    headers: Any


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class DPoPKey:
    """A private key that lives as long as this object, and the nonces servers gave it."""

    def __init__(self, alg: str = "Ed25519") -> None:
        if alg == "Ed25519":
            # RFC 9864's fully specified name for Ed25519 signatures (the same key and
            # signature as "EdDSA", which the broker and gateway accept too).
            base = generate_key("EdDSA")
            self._key: PrivateKey = PrivateKey(kid=base.kid, alg="Ed25519", key=base.key)
        else:
            self._key = generate_key(alg)
        self._nonces: dict[str, str] = {}
        self._lock = threading.Lock()
        self.jkt = jwk_thumbprint(public_jwk(self._key))

    def proof(
        self,
        method: str,
        url: str,
        access_token: str | None = None,
        *,
        narrowing: str | None = None,
    ) -> str:
        with self._lock:
            nonce = self._nonces.get(_origin(url))
        return make_dpop_proof(
            self._key,
            method=method,
            url=url.split("?", 1)[0].split("#", 1)[0],
            now=datetime.now(UTC),
            jti=secrets.token_urlsafe(18),
            access_token=access_token,
            nonce=nonce,
            narrowing=narrowing,
        )

    def learn_nonce(self, url: str, headers: Any) -> bool:
        """Keep the ``DPoP-Nonce`` a server sent; True when it is a new one."""
        nonce = _nonce(headers)
        if nonce is None:
            return False
        with self._lock:
            old = self._nonces.get(_origin(url))
            self._nonces[_origin(url)] = nonce
        return old != nonce

    def is_new_nonce(self, url: str, headers: Any) -> bool:
        """Whether ``headers`` carry a nonce this key does not use yet for ``url``'s origin
        (what :meth:`learn_nonce` would return, without keeping it)."""
        nonce = _nonce(headers)
        with self._lock:
            return nonce is not None and self._nonces.get(_origin(url)) != nonce

    def __repr__(self) -> str:  # never the key
        return f"DPoPKey(jkt={self.jkt!r})"


def _nonce(headers: Any) -> str | None:
    nonce = headers.get("DPoP-Nonce")
    return nonce if isinstance(nonce, str) and nonce and len(nonce) <= 512 else None


#: The gateway's mark on its own refusals (taskbound.gateway.proxy.REFUSAL_HEADER), which
#: it strips from every tool's answer.
REFUSAL_HEADER = "Taskbound-Refusal"


def asks_for_nonce(response: _Response) -> bool:
    return response.status_code in (400, 401) and "use_dpop_nonce" in response.headers.get(
        "WWW-Authenticate", ""
    )


def _from_gateway(response: _Response) -> bool:
    """A tool's answers pass through the gateway: only the gateway's own (marked) answers
    may ask for a nonce, or set one — a tool must not make the SDK send a call twice."""
    return REFUSAL_HEADER in response.headers


def resent_with_nonce(key: DPoPKey, response: httpx.Response) -> bool:
    """Whether :func:`sign_flow` will send this response's request again with the nonce
    the gateway just gave: a refusal to keep from the agent's code, which never sees it.
    (httpx calls response hooks before the auth flow sees the response.)"""
    return (
        _from_gateway(response)
        and asks_for_nonce(response)
        and key.is_new_nonce(str(response.request.url), response.headers)
    )


def sign_flow(
    request: _Request, key: DPoPKey, token: str | None, scheme: str = "DPoP"
) -> Generator[Any, Any, None]:
    """The ``Auth`` flow of a tool's client (through the gateway): credential and proof on
    the request; once more with the nonce when the gateway itself asks for one."""
    url = str(request.url)
    if token is not None:
        request.headers["Authorization"] = f"{scheme} {token}"
    request.headers["DPoP"] = key.proof(
        request.method, url, access_token=token if scheme == "DPoP" else None
    )
    response = yield request
    if not _from_gateway(response):
        return
    if key.learn_nonce(url, response.headers) and asks_for_nonce(response):
        request.headers["DPoP"] = key.proof(
            request.method, url, access_token=token if scheme == "DPoP" else None
        )
        yield request


def check_destination(url: str, within: str | None) -> None:
    """Refuse to send a credential anywhere but below ``within`` (the tool's URL at the
    gateway): an absolute URL given to a tool's client — by mistake, or by text an agent
    was fed — must not carry the credential to another host or another tool."""
    if within is None:
        return
    base = httpx.URL(within)
    target = httpx.URL(url)
    path = base.path.rstrip("/")
    same_origin = (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port)
    try:
        # As a server resolves it (RFC 3986 §6.2.2: %2e%2e is ".."), and as the proof's
        # htu names it: a path that climbs out of the tool is outside it.
        resolved = normalize_htu(url)
        own = normalize_htu(within).rstrip("/")
    except ValueError:
        resolved, own = "", "\0"
    inside = target.path == path or target.path.startswith(path + "/")
    if same_origin and inside and (resolved == own or resolved.startswith(own + "/")):
        return
    raise TaskboundClientError(
        "wrong_destination", f"this client's credential is for {within} only, not {url}"
    )


class TokenAuth(httpx.Auth):
    """``httpx.Auth`` for a credential from ``token`` (awaited before every request, so a
    credential close to its expiry is refreshed first) and the task's DPoP key; with
    ``within``, only for requests below that URL."""

    def __init__(
        self,
        key: DPoPKey,
        token: Callable[[], Awaitable[str]],
        *,
        sync_token: Callable[[], str] | None = None,
        within: str | None = None,
    ) -> None:
        self._key = key
        self._token = token
        self._sync_token = sync_token
        self._within = within

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> Any:  # AsyncGenerator[httpx.Request, httpx.Response]
        check_destination(str(request.url), self._within)
        flow = sign_flow(request, self._key, await self._token())
        response = yield next(flow)
        while True:
            try:
                response = yield flow.send(response)
            except StopIteration:
                return

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if self._sync_token is None:
            raise RuntimeError("this client is async: use an httpx.AsyncClient")
        check_destination(str(request.url), self._within)
        yield from sign_flow(request, self._key, self._sync_token())


def httpx2_auth(
    key: DPoPKey,
    token: Callable[[], Awaitable[str]],
    on_response: Callable[[Any], Awaitable[None]] | None = None,
    *,
    within: str | None = None,
) -> Any:
    """The same, as an ``httpx2.Auth`` for the MCP SDK's client (imported only when used);
    ``on_response`` sees each request's final response (after any nonce retry)."""
    import httpx2

    class _Auth(httpx2.Auth):
        async def async_auth_flow(self, request: Any) -> Any:
            check_destination(str(request.url), within)
            flow = sign_flow(request, key, await token())
            response = yield next(flow)
            while True:
                try:
                    response = yield flow.send(response)
                except StopIteration:
                    if on_response is not None:
                        await on_response(response)
                    return

    return _Auth()
