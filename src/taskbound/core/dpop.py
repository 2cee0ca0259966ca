"""DPoP proofs, RFC 9449: checking them (resource and token endpoints) and making them
(the SDK, the demo and tests).

:func:`verify_dpop_proof` performs every check of RFC 9449 §4.3 except two that belong to the
caller: that the request carried exactly one ``DPoP`` header (item 1), and the ``jti`` replay
check (§11.1), which needs a shared replay cache keyed by :attr:`DPoPProof.jti`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import string
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from joserfc.util import urlsafe_b64encode

from taskbound.core import jws
from taskbound.core.clock import to_epoch
from taskbound.core.keys import (
    PrivateKey,
    algorithm_key,
    jwk_thumbprint,
    parse_public_jwk,
    public_jwk,
)
from taskbound.errors import InvalidDPoPProof, UseDPoPNonce

__all__ = [
    "MAX_JTI_LENGTH",
    "DPoPProof",
    "access_token_hash",
    "make_dpop_proof",
    "normalize_htu",
    "verify_dpop_proof",
]

#: Longest ``jti`` accepted; it becomes a replay-cache key.
MAX_JTI_LENGTH: Final = 256
_MAX_URL_LENGTH: Final = 8192
_MAX_METHOD_LENGTH: Final = 32
_MAX_NONCE_LENGTH: Final = 1024

_TYP: Final = jws.TypRule(allowed=frozenset({"dpop+jwt"}), required=True)  # RFC 9449 §4.2
# RFC 9449 §4.3 item 6: the key is the proof's own jwk and nothing else.
_FOREIGN_KEY_HEADERS: Final = ("jku", "x5u", "x5c")
_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_PERCENT: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: taskbound's claim by which a subject token's consent proof binds the exact narrowing of
#: a token exchange (docs/delegation.md).
NARROWING_CLAIM: Final = "tb_narrowing"


@dataclass(frozen=True)
class DPoPProof:
    """A verified DPoP proof (RFC 9449 §4.2). ``jkt`` is the RFC 7638 thumbprint of
    ``public_jwk``; the caller records ``jti`` in its replay cache."""

    jti: str
    htm: str
    htu: str
    issued_at: datetime
    jkt: str
    public_jwk: Mapping[str, Any]
    nonce: str | None
    ath: str | None
    # taskbound's own claim: the digest of the exact token-exchange narrowing this proof
    # consents to (``taskbound.core.exchange.narrowing_digest``), when the holder bound it.
    narrowing: str | None = None


def access_token_hash(token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url of SHA-256 over the ASCII access token, no padding.

    Raises ``ValueError`` if ``token`` is not ASCII.
    """
    digest = hashlib.sha256(token.encode("ascii")).digest()
    return urlsafe_b64encode(digest).decode("ascii")


def _normalise_percent(path: str) -> str:
    """RFC 3986 §6.2.2.1/§6.2.2.2: upper-case hex digits, decode unreserved characters."""
    if _BAD_PERCENT.search(path):
        raise ValueError("malformed percent-encoding")

    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    return _PERCENT.sub(fix, path)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path."""
    segments = path.split("/")[1:]
    output: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if output:
                output.pop()
            continue
        output.append(segment)
    result = "/" + "/".join(output)
    if segments and segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def normalize_htu(url: str) -> str:
    """The form in which RFC 9449 §4.3 item 9 compares ``htu`` with the request URI.

    RFC 3986 §6.2.2 and §6.2.3: scheme and host lower-cased, the scheme's default port
    removed, percent-encoding normalised, dot segments removed, an empty path made ``/``;
    the query and fragment are dropped. Only ``http`` and ``https`` absolute URIs without
    userinfo (RFC 9110 §4.2.4) are accepted; anything else raises ``ValueError``.
    """
    if not isinstance(url, str) or not url or len(url) > _MAX_URL_LENGTH:
        raise ValueError("not a URL")
    if not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        # urlsplit silently strips some of these; refuse rather than guess.
        raise ValueError("URL has whitespace, control or non-ASCII characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {scheme!r}")
    if "@" in parts.netloc:
        raise ValueError("URL has userinfo")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    port = parts.port  # ValueError when not a number in range
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _normalise_percent(parts.path)
    path = _remove_dot_segments(path) if path else "/"
    return f"{scheme}://{authority}{path}"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def verify_dpop_proof(
    proof: str,
    *,
    method: str,
    url: str,
    now: datetime,
    algorithms: Collection[str],
    iat_window: timedelta,
    access_token: str | None = None,
    expected_jkt: str | None = None,
    expected_nonce: str | None = None,
    max_length: int = 4096,
) -> DPoPProof:
    """Check a DPoP proof for the request ``method`` ``url`` (RFC 9449 §4.3).

    Items checked: 2 (one well-formed compact JWS, length-capped before parsing), 3
    (``jti`` ≤ 256 characters, ``htm``, ``htu``, ``iat``), 4 (``typ`` dpop+jwt), 5 (``alg``
    asymmetric, not ``none``, on ``algorithms``; the RFC 9864 name ``Ed25519`` is accepted
    wherever ``EdDSA`` is), 6 (signature by the ``jwk`` header, the only key source), 7 (no
    private members in ``jwk``), 8 (``htm``), 9 (``htu`` after :func:`normalize_htu` on both
    sides), 11 (``iat`` within ±``iat_window``), 12 (``ath`` for ``access_token``, and the key
    thumbprint equal to ``expected_jkt``; both compared in constant time), and last 10
    (``nonce``), so that :class:`~taskbound.errors.UseDPoPNonce` is only ever the answer to a
    proof that is otherwise good and the client can simply retry with the nonce.

    Raises :class:`~taskbound.errors.InvalidDPoPProof` (or ``UseDPoPNonce``) with a precise
    ``internal`` reason.
    """
    jws.require_aware(now)
    try:
        result = _verify(
            proof,
            method=method,
            url=url,
            now=now,
            algorithms=algorithms,
            iat_window=iat_window,
            access_token=access_token,
            expected_jkt=expected_jkt,
            max_length=max_length,
        )
    except jws.Rejected as exc:
        raise InvalidDPoPProof(internal=exc.reason) from None
    if expected_nonce is not None:
        if result.nonce is None:
            raise UseDPoPNonce(internal="missing nonce")
        if not _same(result.nonce, expected_nonce):
            raise UseDPoPNonce(internal="wrong or stale nonce")
    return result


def _dpop_algorithms(algorithms: Collection[str]) -> frozenset[str]:
    allowed = {algorithms} if isinstance(algorithms, str) else set(algorithms)
    # RFC 9864 §2.2 renames Ed25519-with-EdDSA to "Ed25519"; clients may send either.
    if "EdDSA" in allowed:
        allowed.add("Ed25519")
    return frozenset(allowed)


def _verify(
    proof: str,
    *,
    method: str,
    url: str,
    now: datetime,
    algorithms: Collection[str],
    iat_window: timedelta,
    access_token: str | None,
    expected_jkt: str | None,
    max_length: int,
) -> DPoPProof:
    token = jws.parse_compact(proof, max_length=max_length)
    header = token.header
    alg = jws.check_alg(header, _dpop_algorithms(algorithms))
    jws.check_header(header, _TYP, key_headers=True)
    for name in _FOREIGN_KEY_HEADERS:
        if name in header:
            raise jws.Rejected(f"header not allowed: {name}")
    jwk = header.get("jwk")
    if jwk is None:
        raise jws.Rejected("missing jwk header")
    if not isinstance(jwk, dict):
        raise jws.Rejected("jwk header is not an object")
    try:
        members, key = parse_public_jwk(jwk)
    except ValueError as exc:
        raise jws.Rejected(f"jwk header: {exc}") from None
    kty, crv = algorithm_key(alg)
    if members["kty"] != kty or (crv is not None and members.get("crv") != crv):
        raise jws.Rejected(f"jwk does not fit alg {alg}")
    if not jws.verify_signature(alg, key, token.signing_input, token.signature):
        raise jws.Rejected("bad signature")

    claims = jws.decode_claims(token)
    jti = jws.require_str(claims, "jti")
    if len(jti) > MAX_JTI_LENGTH:
        raise jws.Rejected("jti too long")
    htm = jws.require_str(claims, "htm")
    htu = jws.require_str(claims, "htu")
    issued_at = jws.numeric_date(claims, "iat", required=True, integer=False)
    assert issued_at is not None
    nonce = claims.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or len(nonce) > _MAX_NONCE_LENGTH):
        raise jws.Rejected("nonce is not an acceptable string")
    ath = claims.get("ath")
    if ath is not None and not isinstance(ath, str):
        raise jws.Rejected("ath is not a string")
    narrowing = claims.get(NARROWING_CLAIM)
    if narrowing is not None and (not isinstance(narrowing, str) or len(narrowing) > 128):
        raise jws.Rejected(f"{NARROWING_CLAIM} is not an acceptable string")

    if len(htm) > _MAX_METHOD_LENGTH or htm != method:
        raise jws.Rejected("htm mismatch")
    try:
        expected_htu = normalize_htu(url)
    except ValueError as exc:
        raise jws.Rejected(f"request URL not usable: {exc}") from None
    try:
        presented_htu = normalize_htu(htu)
    except ValueError as exc:
        raise jws.Rejected(f"htu malformed: {exc}") from None
    if presented_htu != expected_htu:
        raise jws.Rejected("htu mismatch")
    if issued_at > now + iat_window:
        raise jws.Rejected("iat too far in the future")
    if issued_at < now - iat_window:
        raise jws.Rejected("iat too old")

    if access_token is not None:
        if ath is None:
            raise jws.Rejected("missing ath")
        try:
            expected_ath = access_token_hash(access_token)
        except ValueError:
            raise jws.Rejected("access token is not ASCII") from None
        if not _same(ath, expected_ath):
            raise jws.Rejected("ath mismatch")
    jkt = jwk_thumbprint(members)
    if expected_jkt is not None and not _same(jkt, expected_jkt):
        raise jws.Rejected("jkt mismatch")
    return DPoPProof(
        jti=jti,
        htm=htm,
        htu=htu,
        issued_at=issued_at,
        jkt=jkt,
        public_jwk=members,
        nonce=nonce,
        ath=ath,
        narrowing=narrowing,
    )


def make_dpop_proof(
    key: PrivateKey,
    *,
    method: str,
    url: str,
    now: datetime,
    jti: str,
    access_token: str | None = None,
    nonce: str | None = None,
    narrowing: str | None = None,
) -> str:
    """A DPoP proof (RFC 9449 §4.2) for ``method`` ``url`` signed by ``key``: header ``typ``
    dpop+jwt, ``alg``, public ``jwk``; claims ``jti``, ``htm``, ``htu`` (without query and
    fragment), ``iat``, and ``ath``/``nonce`` when given."""
    jws.require_aware(now)
    if not jti or len(jti) > MAX_JTI_LENGTH:
        raise ValueError("jti must be 1 to 256 characters")
    jwk = {k: v for k, v in public_jwk(key).items() if k in ("kty", "crv", "x", "y")}
    header = {"typ": "dpop+jwt", "alg": key.alg, "jwk": jwk}
    claims: dict[str, Any] = {
        "jti": jti,
        "htm": method,
        "htu": normalize_htu(url),
        "iat": to_epoch(now),
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    if narrowing is not None:
        claims[NARROWING_CLAIM] = narrowing
    return jws.sign_compact(header, claims, key)
