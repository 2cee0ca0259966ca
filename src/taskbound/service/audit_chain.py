"""Checkpoints, verification and export of the audit chain (docs/audit-format.md).

* :meth:`AuditChain.checkpoint` signs the chain's head with the ``audit`` key and keeps
  it; :meth:`run` does so every ``audit.checkpoint_interval_seconds`` when the head has
  moved. Each checkpoint is also published outside the database — appended to
  ``audit.checkpoint_file`` and POSTed to ``audit.checkpoint_webhook_url`` — so that a
  rewrite of the whole store is detected too.
* :meth:`verify` checks the store: every record against its hash and link, every
  checkpoint's signature and head.
* :func:`ocsf` maps a record to OCSF (API Activity for calls and exchanges, Authorize
  Session for the decisions and lifecycle of authority) for SIEMs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import httpx

from taskbound.config import Settings
from taskbound.core import audit, jws
from taskbound.core.audit import ChainRecord, Checkpoint, Report
from taskbound.core.clock import Clock
from taskbound.core.keys import KeyRing
from taskbound.core.model import KeyPurpose
from taskbound.errors import Conflict
from taskbound.service.keys import KeyManager
from taskbound.storage.base import Storage

__all__ = ["PAGE", "AuditChain", "ocsf"]

log = logging.getLogger("taskbound.audit")

#: Records read per round trip when walking the chain.
PAGE: Final = 5000


class AuditChain:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        keys: KeyManager,
        clock: Clock,
        http: httpx.AsyncClient,
    ) -> None:
        self._settings = settings
        self._storage = storage
        self._keys = keys
        self._clock = clock
        self._http = http
        self.published = 0
        self.publish_failures = 0

    @property
    def issuer(self) -> str:
        return self._settings.issuer

    def keyring(self) -> KeyRing:
        return self._keys.keyring(KeyPurpose.AUDIT)

    def jwks(self) -> dict[str, Any]:
        return self._keys.jwks(KeyPurpose.AUDIT)

    # --- checkpoints ---------------------------------------------------------------------

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the current head (None for an empty chain); the existing checkpoint when
        the head has not moved (or another replica signed it at the same moment)."""
        seq, head = await self._storage.audit_head()
        if seq == 0:
            return None
        last = await self._storage.list_checkpoints(after=seq - 1, limit=1)
        if last and last[0].seq == seq:
            return last[0]
        point = audit.sign_checkpoint(
            seq=seq,
            head=head,
            time=self._clock.now(),
            issuer=self.issuer,
            key=self._keys.signer(KeyPurpose.AUDIT),
        )
        try:
            await self._storage.add_checkpoint(point)
        except Conflict:
            found = await self._storage.list_checkpoints(after=seq - 1, limit=1)
            return found[0] if found else None
        log.info("audit checkpoint", extra={"event": "audit.checkpoint", "seq": seq})
        await self._publish(point)
        return point

    async def checkpoint_at(self, seq: int) -> Checkpoint:
        """A checkpoint pinning record ``seq`` (the end of a segment to archive): the one
        kept, or a new one. ValueError when there is no such record."""
        kept = await self._storage.list_checkpoints(after=seq - 1, limit=1)
        if kept and kept[0].seq == seq:
            return kept[0]
        found = await self._storage.list_chain(after=seq - 1, limit=1)
        if not found or found[0].seq != seq:
            raise ValueError(f"there is no record {seq} in the live chain")
        point = audit.sign_checkpoint(
            seq=seq,
            head=found[0].hash,
            time=self._clock.now(),
            issuer=self.issuer,
            key=self._keys.signer(KeyPurpose.AUDIT),
        )
        try:
            await self._storage.add_checkpoint(point)
        except Conflict:
            return (await self._storage.list_checkpoints(after=seq - 1, limit=1))[0]
        await self._publish(point)
        return point

    async def _publish(self, point: Checkpoint) -> None:
        line = json.dumps(point.line() | {"time": point.time.isoformat(), "kid": point.kid})
        target = self._settings.audit.checkpoint_file
        if target is not None:
            try:
                await asyncio.to_thread(_append_line, Path(target), line)
                self.published += 1
            except OSError:
                self.publish_failures += 1
                log.exception("publishing an audit checkpoint to its file failed")
        url = self._settings.audit.checkpoint_webhook_url
        if url is not None:
            try:
                answer = await self._http.post(
                    url, content=line, headers={"Content-Type": "application/json"}, timeout=10
                )
                answer.raise_for_status()
                self.published += 1
            except httpx.HTTPError:
                self.publish_failures += 1
                log.exception("publishing an audit checkpoint to its webhook failed")

    async def run(self) -> None:
        """Checkpoint every ``audit.checkpoint_interval_seconds`` (never when 0)."""
        interval = self._settings.audit.checkpoint_interval_seconds
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.checkpoint()
            except Exception:
                log.exception("audit checkpoint failed; retrying at the next interval")

    # --- reading -------------------------------------------------------------------------

    async def records(self, after: int = 0) -> AsyncIterator[ChainRecord]:
        """Every record after ``after``, in order, a page at a time."""
        while True:
            page = await self._storage.list_chain(after=after, limit=PAGE)
            for record in page:
                yield record
            if len(page) < PAGE:
                return
            after = page[-1].seq

    async def verify(self) -> Report:
        """Check the whole live store: records, links and checkpoints. When older records
        were archived, the first live record must link to the checkpoint that pinned the
        archive's end."""
        checkpoints = await self._storage.list_checkpoints(limit=1_000_000)
        first = await self._storage.list_chain(after=0, limit=1)
        start = audit.GENESIS
        if first and first[0].seq > 1:
            # What the signature vouches for, never the row's own columns: a row copied
            # from another checkpoint must not pin a cut the store's owner made. Without a
            # pin, the chain is checked from its start (a chain migrated with numbers
            # skipped may start past 1; records cut from the front are reported missing).
            pin = self._signed_head(checkpoints, first[0].seq - 1)
            if pin is not None:
                start = pin
        # The walk hashes every record: it runs in a worker thread, reading the store a
        # page at a time through this loop, so that neither the loop nor memory carries
        # the whole chain.
        loop = asyncio.get_running_loop()

        def pages() -> Iterator[ChainRecord]:
            after = 0
            while True:
                page = asyncio.run_coroutine_threadsafe(
                    self._storage.list_chain(after=after, limit=PAGE), loop
                ).result()
                yield from page
                if len(page) < PAGE:
                    return
                after = page[-1].seq

        return await asyncio.to_thread(
            audit.verify,
            pages(),
            [c.jws for c in checkpoints],
            keys=self.keyring(),
            algorithms=(self._settings.keys.algorithm,),
            start_prev=start,
            # The key is what vouches for a checkpoint; the issuer (the public URL) may
            # have changed since it was signed (a new port, a new host name).
            issuer=None,
        )

    def _signed_head(self, checkpoints: list[Checkpoint], seq: int) -> str | None:
        """The hash a validly signed checkpoint states for record ``seq``, if any."""
        for kept in checkpoints:
            if kept.seq != seq:
                continue
            try:
                point = audit.verify_checkpoint(
                    kept.jws, keys=self.keyring(), algorithms=(self._settings.keys.algorithm,)
                )
            except jws.Rejected:
                continue
            if point.seq == seq:
                return point.hash
        return None


def _append_line(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
        out.flush()


# --- OCSF ------------------------------------------------------------------------------

_API_ACTIVITY: Final = 6003  # OCSF class API Activity (Application Activity, category 6)
_AUTHORIZE_SESSION: Final = 3003  # OCSF class Authorize Session (Identity & Access, 3)
_CALLS: Final = frozenset({"gateway.call", "token.exchange"})


def ocsf(record: ChainRecord) -> dict[str, Any]:
    """One record as an OCSF 1.3 event. Calls and exchanges are API Activity; every other
    record (grants, approvals, break-glass, revocations, sign-ins) is Authorize Session.
    What OCSF has no field for stays under ``unmapped``, with the chain's seq and hash."""
    body = record.body
    allowed = body["decision"] in ("allow", "info")
    api = body["event"] in _CALLS
    class_uid = _API_ACTIVITY if api else _AUTHORIZE_SESSION
    activity_id = 99  # Other: taskbound's own event names are kept in `activity_name`
    time_ms = int(audit.event_of(body).time.timestamp() * 1000)
    event: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": "API Activity" if api else "Authorize Session",
        "category_uid": 6 if api else 3,
        "activity_id": activity_id,
        "activity_name": body["event"],
        "type_uid": class_uid * 100 + activity_id,
        "time": time_ms,
        "severity_id": 1 if allowed else 3,
        "status_id": 1 if allowed else 2,
        "status": "Success" if allowed else "Failure",
        "status_code": body["code"],
        "status_detail": body["detail"],
        "metadata": {
            "version": "1.3.0",
            "product": {"name": "taskbound", "vendor_name": "taskbound"},
            "uid": str(record.seq),
            "correlation_uid": body["txn"],
        },
        "actor": {
            "user": {"uid": body["agent"], "type": "Service"} if body["agent"] else None,
            "session": {"uid": body["task"]} if body["task"] else None,
        },
        "unmapped": {
            "decision": body["decision"],
            "owner": body["owner"],
            "intent": body["intent"],
            "jti": body["jti"],
            "tier": body["tier"],
            "argument_digest": body["argument_digest"],
            "policies": body["policies"],
            "policy_version": body["policy_version"],
            "exception_id": body["exception_id"],
            "chain": {"seq": record.seq, "prev": record.prev, "hash": record.hash},
        },
    }
    if not api:
        # Authorize Session has no API object: the tool and action stay with the rest.
        event["unmapped"] |= {
            "tool": body["tool"],
            "action": body["action"],
            "latency_ms": body["latency_ms"],
            "upstream_status": body["upstream_status"],
        }
        if "arguments" in body:
            event["unmapped"]["arguments"] = body["arguments"]
    if api:
        event["api"] = {
            "operation": body["action"],
            "service": {"name": body["tool"]},
            "response": {"code": body["upstream_status"]},
        }
        if "arguments" in body:
            # The call's recorded (redacted) arguments: the API request's data.
            event["api"]["request"] = {"data": body["arguments"]}
        if body["latency_ms"] is not None:
            event["duration"] = body["latency_ms"]
    return event
