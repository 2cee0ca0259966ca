"""Workload identity at the broker: JWT-SVIDs from trusted SPIFFE domains, OIDC ID tokens
mapped to SPIFFE IDs, and the development issuer (DESIGN.md §3 flow 2).

The token's own unverified ``iss`` only routes it to the verifier of a configured OIDC
issuer; every key comes from configured trust material, never from the token.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from taskbound.config import Settings
from taskbound.core.clock import Clock
from taskbound.core.identity import (
    OIDCRule,
    WorkloadIdentity,
    parse_spiffe_id,
    unverified_issuer,
    verify_jwt_svid,
    verify_oidc_token,
)
from taskbound.core.keys import KeyRing
from taskbound.core.model import KeyPurpose
from taskbound.errors import ConfigError, InvalidIdentity
from taskbound.service.keys import KeyManager
from taskbound.service.trust import JwksSource, discover_oidc_jwks_uri


def _unverified_part(raw: str, index: int) -> dict[str, Any]:
    """A JWS header (0) or payload (1), UNVERIFIED: only to choose which trust material to
    verify against. Everything read here is checked again by the verifier."""
    parts = raw.split(".")
    if len(parts) != 3 or len(parts[index]) > 8192:
        return {}
    segment = parts[index]
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def unverified_kid(raw: str) -> str | None:
    kid = _unverified_part(raw, 0).get("kid")
    return kid if isinstance(kid, str) else None


def _unverified_trust_domain(raw: str) -> str | None:
    sub = _unverified_part(raw, 1).get("sub")
    if not isinstance(sub, str):
        return None
    try:
        return parse_spiffe_id(sub).trust_domain
    except ValueError:
        return None


@dataclass
class _OIDCIssuer:
    rule: OIDCRule
    jwks_url: str | None
    source: JwksSource | None = None


class IdentityVerifier:
    def __init__(
        self,
        settings: Settings,
        keys: KeyManager,
        clock: Clock,
        http: httpx.AsyncClient,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._http = http
        ident = settings.identity
        self._leeway = timedelta(seconds=settings.credentials.clock_leeway_seconds)
        refresh = timedelta(seconds=ident.jwks_refresh_seconds)
        min_refresh = timedelta(seconds=ident.jwks_min_refresh_seconds)
        self._domains: dict[str, JwksSource] = {}
        for td in ident.trust_domains:
            if ident.dev_issuer and td.name == ident.dev_trust_domain:
                raise ConfigError(
                    f"trust domain {td.name!r} is also the development issuer's trust domain"
                )
            if td.jwks_file is not None:
                self._domains[td.name] = JwksSource.from_file(td.jwks_file)
            else:
                assert td.jwks_url is not None
                self._domains[td.name] = JwksSource.from_url(
                    td.jwks_url, http=http, min_refresh=min_refresh, max_age=refresh
                )
        self._oidc: dict[str, _OIDCIssuer] = {
            o.issuer: _OIDCIssuer(
                OIDCRule(
                    issuer=o.issuer,
                    audience=o.audience,
                    algorithms=o.algorithms,
                    spiffe_id_template=o.spiffe_id_template,
                    required_claims=dict(o.required_claims),
                ),
                o.jwks_url,
            )
            for o in ident.oidc
        }
        self._min_refresh = min_refresh
        self._refresh = refresh

    async def _oidc_source(self, issuer: _OIDCIssuer) -> JwksSource:
        if issuer.source is None:
            url = issuer.jwks_url or await discover_oidc_jwks_uri(issuer.rule.issuer, self._http)
            issuer.source = JwksSource.from_url(
                url, http=self._http, min_refresh=self._min_refresh, max_age=self._refresh
            )
        return issuer.source

    async def verify(self, raw: str) -> WorkloadIdentity:
        """Verify a workload identity token.

        Raises :class:`InvalidIdentity` for a token that fails against good trust material
        and :class:`IdentityProviderUnavailable` when that material cannot be obtained.
        Only the trust domain named by the token's own ``sub`` is consulted, so one
        unreachable domain does not stop the agents of the others."""
        if not raw or len(raw) > 8192:
            raise InvalidIdentity(internal="identity token missing or too long")
        iss = unverified_issuer(raw)
        issuer = self._oidc.get(iss) if iss is not None else None
        if issuer is not None:
            oidc_source = await self._oidc_source(issuer)
            return await self._with_refresh(
                raw,
                oidc_source,
                lambda ring: verify_oidc_token(
                    raw,
                    rule=issuer.rule,
                    keys=ring,
                    now=self._clock.now(),
                    leeway=self._leeway,
                ),
            )
        domain = _unverified_trust_domain(raw)
        if domain is None:
            raise InvalidIdentity(internal="sub is not a SPIFFE ID of a trusted domain")
        source = self._domains.get(domain)
        if source is not None:
            return await self._with_refresh(
                raw, source, lambda ring: self._verify_svid(raw, {domain: ring})
            )
        if (
            self._settings.identity.dev_issuer
            and domain == self._settings.identity.dev_trust_domain
        ):
            return self._verify_svid(raw, {domain: self._keys.keyring(KeyPurpose.DEV_IDENTITY)})
        raise InvalidIdentity(internal=f"trust domain {domain!r} is not trusted")

    def _verify_svid(self, raw: str, bundles: Mapping[str, KeyRing]) -> WorkloadIdentity:
        return verify_jwt_svid(
            raw,
            bundles=bundles,
            audience=self._settings.identity_audience,
            algorithms=self._settings.identity.svid_algorithms,
            now=self._clock.now(),
            leeway=self._leeway,
        )

    async def _with_refresh(
        self,
        raw: str,
        source: JwksSource,
        verify: Callable[[KeyRing], WorkloadIdentity],
    ) -> WorkloadIdentity:
        ring = await source.keyring(now=self._clock.now())
        try:
            return verify(ring)
        except InvalidIdentity:
            kid = unverified_kid(raw)
            if kid is None or kid in ring.kids():
                raise
            if not await source.refresh_for_unknown_kid(now=self._clock.now()):
                raise
            return verify(await source.keyring(now=self._clock.now()))
