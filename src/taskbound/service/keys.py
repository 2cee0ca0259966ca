"""Signing keys: generated on first start, stored encrypted, published, rotated with overlap.

The private halves are encrypted with the key-encryption key (KEK) and the key id as
associated data, so a ciphertext moved to another row does not decrypt. The KEK never
reaches the database.

A rotation and a withdrawal are audit records (``admin.key.rotated``,
``admin.key.withdrawn``) naming their cause, durable before the method returns.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from taskbound.core.clock import Clock
from taskbound.core.keys import (
    KeyRing,
    PrivateKey,
    generate_key,
    private_key_from_bytes,
    private_key_to_bytes,
    public_jwk,
)
from taskbound.core.model import KeyPurpose, KeyState, Revocation, RevocationKind, SigningKey
from taskbound.core.secretbox import SecretBox
from taskbound.errors import KeyUnavailable, NotFound
from taskbound.service.audit_records import change_event, clip
from taskbound.storage.base import AuditStore, KeyStore
from taskbound.storage.pending import recorded

#: How long a retired audit key stays published: checkpoints outlive credentials.
AUDIT_KEY_KEPT = timedelta(days=100 * 365)

log = logging.getLogger("taskbound.keys")


class KeyAuditStore(KeyStore, AuditStore, Protocol):
    """Where the keys are kept, and the audit log their changes are recorded in."""


def _aad(kid: str) -> bytes:
    return b"taskbound:signing-key:" + kid.encode()


@dataclass(frozen=True, slots=True)
class _PurposeKeys:
    signer: PrivateKey
    ring: KeyRing
    public: tuple[dict[str, str], ...]


class KeyManager:
    """Holds the decrypted active signer and the published verification keys per purpose.

    ``reload`` re-reads the store, so a rotation made by another process is picked up at
    the next periodic reload (and at once on an unknown ``kid``, by the caller).
    """

    def __init__(
        self,
        store: KeyAuditStore,
        box: SecretBox,
        clock: Clock,
        *,
        algorithm: str,
        overlap: timedelta,
    ) -> None:
        self._store = store
        self._box = box
        self._clock = clock
        self._algorithm = algorithm
        self._overlap = overlap
        self._keys: dict[KeyPurpose, _PurposeKeys] = {}
        self._reloaded_at: datetime | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def _seal(self, key: PrivateKey, purpose: KeyPurpose, now: datetime) -> SigningKey:
        return SigningKey(
            kid=key.kid,
            purpose=purpose,
            alg=key.alg,
            public_jwk=public_jwk(key),
            private_ciphertext=self._box.encrypt(private_key_to_bytes(key), aad=_aad(key.kid)),
            created_at=now,
        )

    async def ensure(self, purposes: tuple[KeyPurpose, ...]) -> None:
        """Make sure each purpose has an active key (generating one on first start), then
        load them. Concurrent first starts agree on one key (the database decides)."""
        now = self._clock.now()
        existing = {k.purpose for k in await self._store.list_keys() if k.state is KeyState.ACTIVE}
        for purpose in purposes:
            if purpose in existing:
                continue
            # The dev identity issuer signs JWT-SVIDs, whose allow-list (SPIFFE) has no EdDSA.
            alg = "ES256" if purpose is KeyPurpose.DEV_IDENTITY else self._algorithm
            won = await self._store.insert_active_key(self._seal(generate_key(alg), purpose, now))
            log.info("signing key ready", extra={"purpose": purpose.value, "kid": won.kid})
        await self.reload()

    async def reload(self) -> None:
        now = self._clock.now()
        stored = await self._store.list_keys()
        loaded: dict[KeyPurpose, _PurposeKeys] = {}
        for purpose in KeyPurpose:
            mine = [k for k in stored if k.purpose is purpose]
            active = [k for k in mine if k.state is KeyState.ACTIVE]
            if not active:
                continue
            published = [
                k
                for k in mine
                if k.state is KeyState.ACTIVE
                or (k.retire_after is not None and k.retire_after > now)
            ]
            signer = self._open(active[0])
            ring = KeyRing.from_jwks({"keys": [dict(k.public_jwk) for k in published]})
            loaded[purpose] = _PurposeKeys(
                signer, ring, tuple(dict(k.public_jwk) for k in published)
            )
        self._keys = loaded
        self._reloaded_at = now

    async def reload_for_unknown_kid(self, kid: str | None) -> bool:
        """Reload when a token names a ``kid`` we do not hold (another replica may have
        rotated), at most once a second. True when a reload happened."""
        now = self._clock.now()
        held = {k for keys in self._keys.values() for k in keys.ring.kids()}
        if kid is None or kid in held:
            return False
        if self._reloaded_at is not None and now - self._reloaded_at < timedelta(seconds=1):
            return False
        await self.reload()
        return True

    def _open(self, stored: SigningKey) -> PrivateKey:
        plain = self._box.decrypt(stored.private_ciphertext, aad=_aad(stored.kid))
        key = private_key_from_bytes(plain, stored.alg)
        if key.kid != stored.kid:
            raise KeyUnavailable(internal=f"stored key {stored.kid} does not match its thumbprint")
        return key

    def _get(self, purpose: KeyPurpose) -> _PurposeKeys:
        keys = self._keys.get(purpose)
        if keys is None:
            raise KeyUnavailable(internal=f"no active {purpose.value} key loaded")
        return keys

    def signer(self, purpose: KeyPurpose = KeyPurpose.CREDENTIALS) -> PrivateKey:
        return self._get(purpose).signer

    def keyring(self, purpose: KeyPurpose = KeyPurpose.CREDENTIALS) -> KeyRing:
        return self._get(purpose).ring

    def jwks(self, purpose: KeyPurpose = KeyPurpose.CREDENTIALS) -> dict[str, Any]:
        """The public JWKS (RFC 7517): the active key and still-valid retiring ones."""
        return {"keys": list(self._get(purpose).public)} if purpose in self._keys else {"keys": []}

    async def rotate(
        self, purpose: KeyPurpose = KeyPurpose.CREDENTIALS, *, cause: str = "system"
    ) -> SigningKey:
        """Make a new active key; the old one stays published for ``overlap`` so that
        credentials it signed keep verifying until they expire."""
        now = self._clock.now()
        alg = "ES256" if purpose is KeyPurpose.DEV_IDENTITY else self._algorithm
        new = self._seal(generate_key(alg), purpose, now)
        retire_after = now + self._overlap
        if purpose is KeyPurpose.AUDIT:
            # Checkpoints are verified for as long as the audit trail is kept: a retired
            # audit key stays published (only a withdrawal takes one away).
            retire_after = now + AUDIT_KEY_KEPT
        event = change_event(
            self._clock,
            "admin.key.rotated",
            f"{purpose.value} key rotated: {new.kid} ({new.alg}) signs from now on; the "
            f"previous one stays published until {retire_after.isoformat()}",
            cause=cause,
        )
        async with recorded(self._store, event):
            await self._store.rotate_key(new, retire_after=retire_after)
        await self.reload()
        log.info("signing key rotated", extra={"purpose": purpose.value, "kid": new.kid})
        return new

    async def withdraw(self, kid: str, *, cause: str, reason: str) -> int:
        """Withdraw a (compromised) key at once: it is no longer published or trusted,
        everything it signed is revoked, and an active key is replaced by a new one in the
        same transaction. Returns how many credentials were revoked. NotFound when no such
        key is stored."""
        now = self._clock.now()
        stored = {k.kid: k for k in await self._store.list_keys()}
        key = stored.get(kid)
        if key is None:
            raise NotFound(f"no signing key {kid!r}")
        replacement = None
        if key.state is KeyState.ACTIVE:
            alg = "ES256" if key.purpose is KeyPurpose.DEV_IDENTITY else self._algorithm
            replacement = self._seal(generate_key(alg), key.purpose, now)
        revoked = await self._store.withdraw_key(kid, now, replacement, cause=cause, reason=reason)
        if revoked is None:
            raise NotFound(f"no signing key {kid!r}")
        await self.reload()
        log.warning(
            "signing key withdrawn",
            extra={
                "event": "key.withdrawn",
                "kid": kid,
                "purpose": key.purpose.value,
                "replacement": None if replacement is None else replacement.kid,
                "credentials_revoked": revoked,
                "cause": cause,
            },
        )
        detail = (
            f"{key.purpose.value} key {kid} withdrawn: {clip(reason)}; {revoked} credential(s) "
            "it signed revoked, with every credential derived from them"
        )
        if replacement is not None:
            detail += f"; replaced by {replacement.kid}"
        await self._store.append_audit(
            change_event(self._clock, "admin.key.withdrawn", detail, cause=cause)
        )
        return revoked

    def on_revocations(self, entries: list[Revocation]) -> None:
        """A key withdrawn by another process: drop it from the keyring now (a reload in
        the background; until it lands, the gateway's revocation state refuses what the
        key signed)."""
        if any(e.kind is RevocationKind.KEY for e in entries):
            task = asyncio.get_running_loop().create_task(self._reload_quietly())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except Exception:  # the periodic reload of the sweep tries again
            log.exception("key reload after a withdrawal failed")

    async def prune(self) -> int:
        removed = await self._store.prune_keys(self._clock.now())
        if removed:
            await self.reload()
        return removed

    async def list(self) -> list[SigningKey]:
        return await self._store.list_keys()
