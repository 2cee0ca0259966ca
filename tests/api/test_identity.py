"""Workload identity end to end: SPIFFE trust bundles (file and URL), OIDC issuers found by
discovery, the development issuer switched off, and identity providers that are down.

The trust material is served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt

from taskbound.core.clock import FakeClock, to_epoch
from taskbound.core.identity import mint_jwt_svid
from taskbound.core.keys import PrivateKey, generate_key, public_jwk

from .conftest import Agent, Live, make_settings, start_live


@dataclass
class IdP:
    """A tiny identity provider: serves JSON documents by path; can be switched off."""

    base: str
    docs: dict[str, Any] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    down: bool = False


@pytest.fixture
def idp() -> Iterator[IdP]:
    state = IdP("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            doc = state.docs.get(self.path)
            if state.down or doc is None:
                self.send_error(503 if state.down else 404)
                return
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def jwks(*keys: PrivateKey) -> dict[str, Any]:
    return {"keys": [public_jwk(k) for k in keys]}


def svid(key: PrivateKey, spiffe_id: str, live: Live) -> str:
    return mint_jwt_svid(
        key,
        spiffe_id=spiffe_id,
        audience=live.base,
        now=live.clock.now(),
        ttl=timedelta(minutes=5),
        jti="j-" + spiffe_id[-6:],
    )


async def register(live: Live, spiffe_id: str) -> None:
    spec = {
        "spiffe_id": spiffe_id,
        "owner": "alice",
        "ceiling": [{"tool": "issues", "tier": "read"}],
    }
    r = await live.http.post("/v1/admin/agents", json=spec, headers=live.admin)
    assert r.status_code == 201, r.text


async def start(live: Live, identity: str) -> Any:
    return await Agent(live, identity).start(scopes=[{"tool": "issues", "tier": "read"}])


@pytest.fixture
async def prod(
    tmp_path: Path, clock: FakeClock, idp: IdP
) -> AsyncIterator[tuple[Live, dict[str, PrivateKey]]]:
    """A server trusting: `files.example` (bundle file), `urls.example` (bundle URL) and an
    OIDC issuer (Kubernetes-style claims), with the development issuer off."""
    keys = {
        "file": generate_key("ES256"),
        "url": generate_key("ES256"),
        "oidc": generate_key("ES256"),
    }
    bundle = tmp_path / "files.example.jwks"
    bundle.write_text(json.dumps(jwks(keys["file"])))
    idp.docs["/bundle"] = jwks(keys["url"])
    idp.docs["/.well-known/openid-configuration"] = {
        "issuer": idp.base,
        "jwks_uri": f"{idp.base}/oidc-keys",
    }
    idp.docs["/oidc-keys"] = jwks(keys["oidc"])
    settings = make_settings(
        tmp_path,
        identity={
            "dev_issuer": False,
            "jwks_min_refresh_seconds": 1,
            "trust_domains": [
                {"name": "files.example", "jwks_file": str(bundle)},
                {"name": "urls.example", "jwks_url": f"{idp.base}/bundle"},
            ],
            "oidc": [
                {
                    "issuer": idp.base,
                    "audience": "taskbound",
                    "spiffe_id_template": (
                        "spiffe://k8s.example/ns/{kubernetes.io/namespace}"
                        "/sa/{kubernetes.io/serviceaccount/name}"
                    ),
                    "algorithms": ["ES256"],
                    "required_claims": {"kubernetes.io/namespace": "payments"},
                }
            ],
        },
    )
    async for live in start_live(settings, clock):
        yield live, keys


async def test_jwt_svid_from_a_bundle_file(prod: tuple[Live, dict[str, PrivateKey]]) -> None:
    live, keys = prod
    await register(live, "spiffe://files.example/agents/a")
    r = await start(live, svid(keys["file"], "spiffe://files.example/agents/a", live))
    assert r.status_code == 201, r.text
    # A key of another trust domain cannot vouch for this one.
    r = await start(live, svid(keys["url"], "spiffe://files.example/agents/a", live))
    assert r.status_code == 401


async def test_jwt_svid_from_a_bundle_url_follows_rotation(
    prod: tuple[Live, dict[str, PrivateKey]], idp: IdP
) -> None:
    live, keys = prod
    await register(live, "spiffe://urls.example/agents/b")
    assert (
        await start(live, svid(keys["url"], "spiffe://urls.example/agents/b", live))
    ).status_code == 201
    rotated = generate_key("ES256")
    idp.docs["/bundle"] = jwks(rotated, keys["url"])
    live.clock.advance(2)  # past jwks_min_refresh_seconds
    r = await start(live, svid(rotated, "spiffe://urls.example/agents/b", live))
    assert r.status_code == 201, r.text


async def test_oidc_token_mapped_to_a_spiffe_id(
    prod: tuple[Live, dict[str, PrivateKey]], idp: IdP
) -> None:
    live, keys = prod
    await register(live, "spiffe://k8s.example/ns/payments/sa/refunds-bot")

    def token(namespace: str, name: str, **over: Any) -> str:
        now = to_epoch(live.clock.now())
        claims = {
            "iss": idp.base,
            "aud": "taskbound",
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "exp": now + 300,
            "iat": now,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name}},
        }
        claims.update(over)
        key = keys["oidc"]
        return jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key.key, algorithms=["ES256"])

    r = await start(live, token("payments", "refunds-bot"))
    assert r.status_code == 201, r.text
    assert r.json()["agent"] == "spiffe://k8s.example/ns/payments/sa/refunds-bot"
    for bad in (
        token(
            "payments",
            "..",
        ),  # path injection through a claim
        token("default", "refunds-bot"),  # required claim
        token("payments", "refunds-bot", aud="someone-else"),
        token("payments", "refunds-bot", exp=to_epoch(live.clock.now()) - 3600),
    ):
        r = await start(live, bad)
        assert r.status_code == 401, r.text
        assert r.json()["code"] == "invalid_identity_token"


async def test_dev_issuer_off_means_dev_tokens_and_minting_are_refused(
    prod: tuple[Live, dict[str, PrivateKey]],
) -> None:
    live, _ = prod
    r = await live.http.post(
        "/v1/admin/dev/identity",
        json={"spiffe_id": "spiffe://taskbound.local/agents/bot"},
        headers=live.admin,
    )
    assert r.status_code == 404
    # Even a token signed by a key the server once used for the dev issuer is refused.
    rogue = generate_key("ES256")
    r = await start(live, svid(rogue, "spiffe://taskbound.local/agents/bot", live))
    assert r.status_code == 401


async def test_identity_provider_down_is_503_not_401(
    prod: tuple[Live, dict[str, PrivateKey]], idp: IdP
) -> None:
    live, keys = prod
    await register(live, "spiffe://urls.example/agents/c")
    await register(live, "spiffe://files.example/agents/d")
    idp.down = True
    r = await start(live, svid(keys["url"], "spiffe://urls.example/agents/c", live))
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "identity_provider_unavailable"
    # Other trust domains keep working while one is down.
    r = await start(live, svid(keys["file"], "spiffe://files.example/agents/d", live))
    assert r.status_code == 201, r.text
