"""Helpers for the crypto-core tests: a fixed instant, keys, and a token forger that can
produce anything an attacker could (any header, any payload bytes, any key)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey
from joserfc.jws import JWSRegistry
from joserfc.util import urlsafe_b64encode

from taskbound.core.clock import FakeClock
from taskbound.core.keys import PrivateKey, generate_key, public_jwk
from taskbound.core.model import Tier
from taskbound.core.tokens import CredentialClaims

NOW = FakeClock().now()

ISSUER = "https://broker.example"
TOOL_AUDIENCE = "https://gateway.example/github"
AGENT = "spiffe://example.org/agents/coder"
LEEWAY = timedelta(seconds=30)


def b64(data: bytes) -> str:
    return urlsafe_b64encode(data).decode("ascii")


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode("utf-8"))


@functools.cache
def key(alg: str, n: int = 0) -> PrivateKey:
    """Key number ``n`` for ``alg``, generated once per test run."""
    return generate_key(alg)


@functools.cache
def rsa_native(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def rsa_key(bits: int = 2048) -> RSAKey:
    return RSAKey.import_key(rsa_native(bits))


def public_members(k: PrivateKey) -> dict[str, str]:
    return {m: v for m, v in public_jwk(k).items() if m in ("kty", "crv", "x", "y")}


def sign_segments(header_segment: str, payload_segment: str, signer: Any, alg: str) -> str:
    """Sign arbitrary segments with joserfc's algorithm object for ``alg``."""
    model = JWSRegistry.algorithms[alg]
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    raw_key = signer.key if isinstance(signer, PrivateKey) else signer
    signature = model.sign(signing_input, raw_key)
    return f"{header_segment}.{payload_segment}.{b64(signature)}"


def forge(
    header: Mapping[str, Any], claims: Mapping[str, Any] | bytes, signer: Any, alg: str
) -> str:
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode("utf-8")
    return sign_segments(b64json(dict(header)), b64(payload), signer, alg)


def credential_claims(**overrides: Any) -> CredentialClaims:
    from taskbound.core.keys import jwk_thumbprint

    values: dict[str, Any] = {
        "issuer": ISSUER,
        "subject": AGENT,
        "audience": TOOL_AUDIENCE,
        "client_id": AGENT,
        "jti": "cred-1",
        "issued_at": NOW,
        "not_before": NOW,
        "expires_at": NOW + timedelta(minutes=5),
        "task_id": "task-1",
        "owner_id": "owner-1",
        "purpose": "fix the flaky test in acme/web",
        "constraints": {"repo": "acme/web"},
        "tool": "github",
        "tier": Tier.WRITE,
        "actions": ("push", "open_pr"),
        "jkt": jwk_thumbprint(public_jwk(key("ES256", 99))),
    }
    values.update(overrides)
    return CredentialClaims(**values)


def credential_payload(**overrides: Any) -> dict[str, Any]:
    """The wire payload of a valid credential, to be edited and forged."""
    from taskbound.core.clock import to_epoch

    c = credential_claims()
    payload: dict[str, Any] = {
        "iss": c.issuer,
        "sub": c.subject,
        "aud": c.audience,
        "client_id": c.client_id,
        "jti": c.jti,
        "iat": to_epoch(c.issued_at),
        "nbf": to_epoch(c.not_before),
        "exp": to_epoch(c.expires_at),
        "scope": "github:write",
        "authorization_details": [
            {
                "type": "taskbound_tool",
                "tool": "github",
                "tier": "write",
                "actions": ["push", "open_pr"],
                "constraints": {"repo": "acme/web"},
            }
        ],
        "cnf": {"jkt": c.jkt},
        "tsk": c.task_id,
        "owner": c.owner_id,
        "intent": c.purpose,
    }
    payload.update(overrides)
    return payload
