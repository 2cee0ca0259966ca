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

import httpx

from taskbound.config import Settings
from taskbound.core.clock import Clock
from taskbound.core.identity import (
    OIDCRule,
    WorkloadIdentity,
    unverified_issuer,
    verify_jwt_svid,
    verify_oidc_token,
)
from taskbound.core.keys import KeyRing
from taskbound.core.model import KeyPurpose
from taskbound.errors import InvalidIdentity
from taskbound.service.keys import KeyManager
from taskbound.service.trust import JwksSource, discover_oidc_jwks_uri


def _unverified_kid(raw: str) -> str | None:
    """The header's ``kid``, unverified, only to decide whether a key refresh may help."""
    head = raw.split(".", 1)[0]
    if len(head) > 2048:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


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

    async def _bundles(self) -> dict[str, KeyRing]:
        now = self._clock.now()
        bundles = {name: await src.keyring(now=now) for name, src in self._domains.items()}
        if self._settings.identity.dev_issuer:
            bundles[self._settings.identity.dev_trust_domain] = self._keys.keyring(
                KeyPurpose.DEV_IDENTITY
            )
        return bundles

    async def _oidc_source(self, issuer: _OIDCIssuer) -> JwksSource:
        if issuer.source is None:
            url = issuer.jwks_url or await discover_oidc_jwks_uri(issuer.rule.issuer, self._http)
            issuer.source = JwksSource.from_url(
                url, http=self._http, min_refresh=self._min_refresh, max_age=self._refresh
            )
        return issuer.source

    async def verify(self, raw: str) -> WorkloadIdentity:
        """Verify a workload identity token; raises :class:`InvalidIdentity`."""
        if not raw or len(raw) > 8192:
            raise InvalidIdentity(internal="identity token missing or too long")
        iss = unverified_issuer(raw)
        issuer = self._oidc.get(iss) if iss is not None else None
        if issuer is not None:
            source = await self._oidc_source(issuer)
            return await self._with_refresh(
                raw,
                source,
                lambda ring: verify_oidc_token(
                    raw,
                    rule=issuer.rule,
                    keys=ring,
                    now=self._clock.now(),
                    leeway=self._leeway,
                ),
            )
        bundles = await self._bundles()
        try:
            return self._verify_svid(raw, bundles)
        except InvalidIdentity:
            # An unknown kid from a URL-backed trust domain may be a key the domain has just
            # rotated in: refetch its bundle (rate-limited by the source) and try once more.
            kid = _unverified_kid(raw)
            refreshed = False
            for name, src in self._domains.items():
                if kid is not None and kid not in bundles[name].kids():
                    refreshed |= await src.refresh_for_unknown_kid(now=self._clock.now())
            if not refreshed:
                raise
            return self._verify_svid(raw, await self._bundles())

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
            kid = _unverified_kid(raw)
            if kid is None or kid in ring.kids():
                raise
            if not await source.refresh_for_unknown_kid(now=self._clock.now()):
                raise
            return verify(await source.keyring(now=self._clock.now()))
