"""Where an agent's workload identity comes from: never a shared secret.

- :class:`SpiffeWorkloadApi`: a JWT-SVID from the SPIFFE Workload API (SPIRE agent…),
  through the ``spiffe`` package (``pip install 'taskbound[spiffe]'``); chosen by
  :func:`identity_from_env` when ``SPIFFE_ENDPOINT_SOCKET`` is set.
- :class:`TokenFile`: a token a platform writes and rotates (a Kubernetes projected
  service-account token, a CI OIDC token), read again whenever it is needed.
- :class:`DevIssuer`: the broker's development issuer (dev mode only), for laptops and
  demos.

A source answers :meth:`IdentitySource.token`; the client asks before every broker call
that needs the identity, and sources cache only while a token has time left.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from taskbound.sdk.errors import IdentityUnavailable

__all__ = [
    "DevIssuer",
    "IdentitySource",
    "SpiffeWorkloadApi",
    "StaticToken",
    "TokenFile",
    "identity_from_env",
]

#: A token file larger than this is not a token.
MAX_TOKEN_BYTES = 64 * 1024
#: A cached token is replaced this long before it expires.
RENEW_BEFORE_S = 30.0


@runtime_checkable
class IdentitySource(Protocol):
    async def token(self) -> str:
        """A current identity token (JWT-SVID or OIDC ID token); IdentityUnavailable when
        none can be had."""
        ...


def _expiry(token: str) -> float | None:
    """The ``exp`` of a JWT, read without verification — only to know when to fetch a new
    one (the broker verifies it)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, AttributeError):
        return None


class _Cached:
    def __init__(self) -> None:
        self._token: str | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> str | None:
        return self._token if self._token and time.time() < self._until else None

    def _keep(self, token: str, expires_at: float | None) -> str:
        self._token = token
        self._until = (expires_at or time.time() + 60) - RENEW_BEFORE_S
        return token


class StaticToken:
    """A token given as is (tests, or a token obtained some other way)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise IdentityUnavailable("the identity token is empty")
        self._token = token

    async def token(self) -> str:
        return self._token


class TokenFile:
    """A token a platform keeps fresh in a file (Kubernetes projected token, CI OIDC
    token): read on every use, so a rotated token is picked up at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def token(self) -> str:
        # In a thread: a file on a stalled mount must not stop the agent's event loop.
        raw = await asyncio.to_thread(self._read)
        if len(raw) > MAX_TOKEN_BYTES:
            raise IdentityUnavailable(f"the token file {self.path} is too large for a token")
        token = raw.decode("utf-8", "replace").strip()
        if not token:
            raise IdentityUnavailable(f"the token file {self.path} is empty")
        return token

    def _read(self) -> bytes:
        try:
            # Opened without blocking, then checked: a FIFO or a device is not a token file.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise IdentityUnavailable(f"the token file {self.path} is not a regular file")
                return f.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise IdentityUnavailable(f"cannot read the token file {self.path}: {exc}") from None


class SpiffeWorkloadApi(_Cached):
    """A JWT-SVID for ``audience`` (the broker's identity audience, by default its base
    URL) from the SPIFFE Workload API at ``socket`` (default: ``SPIFFE_ENDPOINT_SOCKET``)."""

    def __init__(self, audience: str, *, socket: str | None = None, timeout: float = 10) -> None:
        super().__init__()
        self.audience = audience
        self.socket = socket
        self.timeout = timeout

    async def token(self) -> str:
        async with self._lock:
            cached = self._fresh()
            if cached is not None:
                return cached
            token = await asyncio.to_thread(self._fetch)
            return self._keep(token, _expiry(token))

    def _fetch(self) -> str:
        try:
            from spiffe import WorkloadApiClient
        except ImportError:
            raise IdentityUnavailable(
                "the SPIFFE Workload API needs the spiffe package: pip install 'taskbound[spiffe]'"
            ) from None
        try:
            with WorkloadApiClient(socket_path=self.socket) as client:
                svid = client.fetch_jwt_svid(audience={self.audience}, timeout=self.timeout)
        except Exception as exc:  # the library raises its own and gRPC errors
            raise IdentityUnavailable(f"the SPIFFE Workload API failed: {exc}") from None
        return str(svid.token)


class DevIssuer(_Cached):
    """The broker's development issuer (``identity.dev_issuer``; never in production): a
    JWT-SVID for ``spiffe_id`` minted with an admin token."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        spiffe_id: str,
        *,
        ttl_seconds: int = 300,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.spiffe_id = spiffe_id
        self.ttl_seconds = ttl_seconds
        self._admin = admin_token
        self._http = http

    async def token(self) -> str:
        async with self._lock:
            cached = self._fresh()
            if cached is not None:
                return cached
            body: Any = None
            try:
                async with _client(self._http) as http:
                    r = await http.post(
                        f"{self.base_url}/v1/admin/dev/identity",
                        json={"spiffe_id": self.spiffe_id, "ttl_seconds": self.ttl_seconds},
                        headers={"Authorization": f"Bearer {self._admin}"},
                    )
                    body = r.json() if r.content else None
            except (httpx.HTTPError, ValueError) as exc:
                raise IdentityUnavailable(f"the development issuer failed: {exc}") from None
            if r.status_code != 201 or not isinstance(body, dict) or "token" not in body:
                why = body.get("detail") if isinstance(body, dict) else None
                raise IdentityUnavailable(
                    f"the development issuer refused ({r.status_code}): {why or r.text[:200]}"
                )
            return self._keep(str(body["token"]), _expiry(str(body["token"])))


@contextlib.asynccontextmanager
async def _client(http: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client as is, or a new one closed afterwards."""
    if http is not None:
        yield http
        return
    async with httpx.AsyncClient(timeout=30) as own:
        yield own


def identity_from_env(audience: str) -> IdentitySource:
    """The identity this process has: the SPIFFE Workload API when
    ``SPIFFE_ENDPOINT_SOCKET`` is set, else the file named by
    ``TASKBOUND_IDENTITY_TOKEN_FILE``; IdentityUnavailable when neither is."""
    socket = os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    if socket:
        return SpiffeWorkloadApi(audience, socket=socket)
    path = os.environ.get("TASKBOUND_IDENTITY_TOKEN_FILE")
    if path:
        return TokenFile(path)
    raise IdentityUnavailable(
        "no workload identity: set SPIFFE_ENDPOINT_SOCKET (SPIFFE Workload API) or "
        "TASKBOUND_IDENTITY_TOKEN_FILE (a platform-issued token), or pass identity="
    )
