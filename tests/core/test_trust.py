"""service/trust.py against a real HTTP server on 127.0.0.1 (no mocks of httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskbound.core.keys import KeyRing, private_key_to_bytes, public_jwk
from taskbound.errors import IdentityProviderUnavailable
from taskbound.service.trust import MAX_RESPONSE_BYTES, JwksSource, discover_oidc_jwks_uri

from ._crypto import NOW, key

MIN_REFRESH = timedelta(seconds=30)
MAX_AGE = timedelta(minutes=5)


@dataclass
class Route:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    send_length: bool = True


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    hits: dict[str, int]

    def serve(self, path: str, value: Any, **kwargs: Any) -> str:
        body = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.routes[path] = Route(body, **kwargs)
        return self.base + path


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            server.hits[self.path] = server.hits.get(self.path, 0) + 1
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            if route.delay:
                time.sleep(route.delay)
            self.send_response(route.status)
            self.send_header("Content-Type", "application/json")
            if route.send_length:
                self.send_header("Content-Length", str(len(route.body)))
            for name, value in route.headers.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(route.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(base="", routes={}, hits={})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def jwks(*keys: Any) -> dict[str, Any]:
    return {"keys": [public_jwk(k) for k in keys]}


K1, K2 = key("ES256", 50), key("EdDSA", 50)


# --- from_url -------------------------------------------------------------------------


async def test_url_source_caches_and_refreshes_after_max_age(
    server: Server, http: httpx.AsyncClient
) -> None:
    url = server.serve("/jwks", jwks(K1))
    source = JwksSource.from_url(url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE)
    ring = await source.keyring(now=NOW)
    assert ring.kids() == {K1.kid}
    assert (await source.keyring(now=NOW + MAX_AGE - timedelta(seconds=1))) is ring
    assert server.hits["/jwks"] == 1
    server.serve("/jwks", jwks(K1, K2))
    assert (await source.keyring(now=NOW + MAX_AGE)).kids() == {K1.kid, K2.kid}
    assert server.hits["/jwks"] == 2


async def test_concurrent_callers_share_one_fetch(server: Server, http: httpx.AsyncClient) -> None:
    url = server.serve("/jwks", jwks(K1), delay=0.2)
    source = JwksSource.from_url(url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE)
    rings = await asyncio.gather(*(source.keyring(now=NOW) for _ in range(5)))
    assert all(r is rings[0] for r in rings)
    assert server.hits["/jwks"] == 1


async def test_unknown_kid_refresh_is_rate_limited(server: Server, http: httpx.AsyncClient) -> None:
    url = server.serve("/jwks", jwks(K1))
    source = JwksSource.from_url(url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE)
    await source.keyring(now=NOW)
    server.serve("/jwks", jwks(K1, K2))
    assert await source.refresh_for_unknown_kid(now=NOW + timedelta(seconds=5)) is False
    assert server.hits["/jwks"] == 1
    later = NOW + MIN_REFRESH
    assert await source.refresh_for_unknown_kid(now=later) is True
    assert (await source.keyring(now=later)).kids() == {K1.kid, K2.kid}
    assert await source.refresh_for_unknown_kid(now=later + timedelta(seconds=29)) is False
    assert server.hits["/jwks"] == 2


async def test_failed_unknown_kid_refresh_keeps_the_old_ring(
    server: Server, http: httpx.AsyncClient
) -> None:
    url = server.serve("/jwks", jwks(K1))
    source = JwksSource.from_url(url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE)
    ring = await source.keyring(now=NOW)
    server.serve("/jwks", b"oops", status=500)
    assert await source.refresh_for_unknown_kid(now=NOW + MIN_REFRESH) is False
    assert source.last_error is not None
    assert "HTTP 500" in source.last_error
    assert await source.keyring(now=NOW + MIN_REFRESH) is ring


def _private_jwks() -> dict[str, Any]:
    return {"keys": [json.loads(private_key_to_bytes(K1))]}


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        (Route(b"missing", status=404), "HTTP 404"),
        (Route(b"", status=302, headers={"Location": "/elsewhere"}), "HTTP 302"),
        (Route(b"not json"), "not JSON"),
        (Route(b"[1]"), "JWK Set must be a JSON object"),
        (Route(json.dumps(_private_jwks()).encode()), "private or secret members: d"),
        (Route(b" " * (MAX_RESPONSE_BYTES + 1)), "response too large"),
        (Route(b" " * (MAX_RESPONSE_BYTES + 1), send_length=False), "response too large"),
        (Route(b"{}", delay=1.0), "timed out"),
    ],
)
async def test_url_source_failures(
    server: Server, http: httpx.AsyncClient, route: Route, reason: str
) -> None:
    server.routes["/jwks"] = route
    source = JwksSource.from_url(
        server.base + "/jwks", http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE, time_limit=0.3
    )
    with pytest.raises(IdentityProviderUnavailable) as info:
        await source.keyring(now=NOW)
    assert reason in info.value.internal
    assert info.value.detail == IdentityProviderUnavailable.default_detail


async def test_connection_refused(http: httpx.AsyncClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = JwksSource.from_url(
        f"http://127.0.0.1:{port}/jwks", http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE
    )
    with pytest.raises(IdentityProviderUnavailable) as info:
        await source.keyring(now=NOW)
    assert "ConnectError" in info.value.internal


async def test_stale_ring_fails_closed_unless_granted_grace(
    server: Server, http: httpx.AsyncClient
) -> None:
    url = server.serve("/jwks", jwks(K1))
    strict = JwksSource.from_url(url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE)
    lenient = JwksSource.from_url(
        url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE, stale_grace=timedelta(hours=1)
    )
    await strict.keyring(now=NOW)
    ring = await lenient.keyring(now=NOW)
    server.serve("/jwks", b"down", status=503)
    with pytest.raises(IdentityProviderUnavailable) as info:
        await strict.keyring(now=NOW + MAX_AGE)
    assert "HTTP 503" in info.value.internal
    assert await lenient.keyring(now=NOW + MAX_AGE) is ring
    with pytest.raises(IdentityProviderUnavailable):
        await lenient.keyring(now=NOW + MAX_AGE + timedelta(hours=1))


async def test_failures_are_not_retried_within_min_refresh(
    server: Server, http: httpx.AsyncClient
) -> None:
    url = server.serve("/jwks", b"down", status=503)
    source = JwksSource.from_url(url, http=http, min_refresh=MIN_REFRESH, max_age=MAX_AGE)
    for offset in (0, 1, 29):
        with pytest.raises(IdentityProviderUnavailable) as info:
            await source.keyring(now=NOW + timedelta(seconds=offset))
        assert "HTTP 503" in info.value.internal
    assert server.hits["/jwks"] == 1
    server.serve("/jwks", jwks(K1))
    assert (await source.keyring(now=NOW + MIN_REFRESH)).kids() == {K1.kid}


def test_source_parameters_are_checked() -> None:
    async def load() -> KeyRing:
        return KeyRing({})

    with pytest.raises(ValueError, match="max_age"):
        JwksSource(load, location="x", min_refresh=MIN_REFRESH, max_age=timedelta(0))


# --- from_file ------------------------------------------------------------------------


async def test_file_source_reloads_after_max_age(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(jwks(K1)))
    source = JwksSource.from_file(path, max_age=MAX_AGE)
    assert (await source.keyring(now=NOW)).kids() == {K1.kid}
    path.write_text(json.dumps(jwks(K2)))
    assert (await source.keyring(now=NOW + timedelta(seconds=1))).kids() == {K1.kid}
    assert (await source.keyring(now=NOW + MAX_AGE)).kids() == {K2.kid}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "FileNotFoundError"),
        (b"{", "not JSON"),
        (b" " * (MAX_RESPONSE_BYTES + 1), "too large"),
        (json.dumps({"keys": "x"}).encode(), "'keys' array"),
    ],
)
async def test_file_source_failures(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "bundle.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IdentityProviderUnavailable) as info:
        await JwksSource.from_file(path).keyring(now=NOW)
    assert reason in info.value.internal


# --- OIDC discovery -------------------------------------------------------------------


async def test_discovery_returns_jwks_uri(server: Server, http: httpx.AsyncClient) -> None:
    issuer = server.base + "/tenant"
    jwks_url = server.serve("/tenant/keys", jwks(K1))
    server.serve(
        "/tenant/.well-known/openid-configuration", {"issuer": issuer, "jwks_uri": jwks_url}
    )
    assert await discover_oidc_jwks_uri(issuer, http) == jwks_url
    source = JwksSource.from_url(
        await discover_oidc_jwks_uri(issuer, http),
        http=http,
        min_refresh=MIN_REFRESH,
        max_age=MAX_AGE,
    )
    assert (await source.keyring(now=NOW)).kids() == {K1.kid}


async def test_discovery_strips_trailing_slash_but_compares_exactly(
    server: Server, http: httpx.AsyncClient
) -> None:
    issuer = server.base + "/t/"
    server.serve(
        "/t/.well-known/openid-configuration", {"issuer": issuer, "jwks_uri": server.base + "/k"}
    )
    assert await discover_oidc_jwks_uri(issuer, http) == server.base + "/k"
    with pytest.raises(IdentityProviderUnavailable) as info:
        await discover_oidc_jwks_uri(server.base + "/t", http)
    assert "issuer mismatch" in info.value.internal


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([], "not a JSON object"),
        ({"issuer": "https://evil.example", "jwks_uri": "https://evil.example/k"}, "mismatch"),
        ({"issuer": "ISSUER"}, "no jwks_uri"),
        ({"issuer": "ISSUER", "jwks_uri": 7}, "no jwks_uri"),
        ({"issuer": "ISSUER", "jwks_uri": "/relative"}, "jwks_uri not https"),
        ({"issuer": "ISSUER", "jwks_uri": "ftp://127.0.0.1/k"}, "jwks_uri not https"),
    ],
)
async def test_discovery_failures(
    server: Server, http: httpx.AsyncClient, document: Any, reason: str
) -> None:
    issuer = server.base + "/idp"
    if isinstance(document, dict) and document.get("issuer") == "ISSUER":
        document = {**document, "issuer": issuer}
    server.serve("/idp/.well-known/openid-configuration", document)
    with pytest.raises(IdentityProviderUnavailable) as info:
        await discover_oidc_jwks_uri(issuer, http)
    assert reason in info.value.internal


async def test_discovery_of_unreachable_issuer(server: Server, http: httpx.AsyncClient) -> None:
    with pytest.raises(IdentityProviderUnavailable) as info:
        await discover_oidc_jwks_uri(server.base + "/nobody", http)
    assert "HTTP 404" in info.value.internal
