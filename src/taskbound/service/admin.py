"""Admin authentication: bootstrap tokens created by `taskbound admin init`.

A token is 256 random bits shown once; only its SHA-256 is stored. Lookup is by hash,
and the stored hash is compared again in constant time. Admin identity is kept behind
:func:`authenticate_admin` so that OIDC sign-in can be added beside tokens later.

Creating a token is an audit record (``admin.token.created``) naming the token's id, never
the token or its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

from taskbound.core.clock import Clock
from taskbound.core.model import AdminToken
from taskbound.errors import InvalidAdminToken
from taskbound.service.audit_records import change_event, clip
from taskbound.storage.base import AdminTokenStore, AuditStore
from taskbound.storage.pending import recorded

log = logging.getLogger("taskbound.admin")

ADMIN_TOKEN_PREFIX = "tbat_"  # noqa: S105 - a public prefix, not a secret


class AdminTokenAuditStore(AdminTokenStore, AuditStore, Protocol):
    """Where admin tokens are kept, and the audit log their creation is recorded in."""


def hash_admin_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class NewAdminToken:
    token: str
    record: AdminToken


async def create_admin_token(
    store: AdminTokenAuditStore, clock: Clock, description: str, *, cause: str = "system"
) -> NewAdminToken:
    """A new admin token, shown once; durable, and recorded, when this returns."""
    token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = AdminToken(
        id="adm_" + secrets.token_urlsafe(8),
        token_hash=hash_admin_token(token),
        description=description,
        created_at=clock.now(),
    )
    event = change_event(
        clock,
        "admin.token.created",
        f"admin token {record.id} created: {clip(description)}",
        cause=cause,
    )
    async with recorded(store, event):
        await store.add_admin_token(record)
    log.info("admin token created", extra={"event": "admin_token.created", "token_id": record.id})
    return NewAdminToken(token, record)


async def authenticate_admin(store: AdminTokenStore, token: str | None) -> AdminToken:
    if not token or not token.startswith(ADMIN_TOKEN_PREFIX) or len(token) > 256:
        raise InvalidAdminToken()
    digest = hash_admin_token(token)
    record = await store.find_admin_token(digest)
    if record is None or not hmac.compare_digest(record.token_hash, digest):
        raise InvalidAdminToken()
    if record.revoked_at is not None:
        raise InvalidAdminToken(internal=f"admin token {record.id} is revoked")
    return record
