"""The audit chain (docs/audit-format.md): every record carries the SHA-256 of its
predecessor, and signed checkpoints pin the head, so that nobody — whoever runs the
database included — can change, remove, insert or reorder a record unnoticed.

Format version 1. A record's **body** is the fixed set of fields of
:class:`~taskbound.core.model.AuditEvent` (:data:`FIELDS`), absent values as ``null``, time
as RFC 3339 UTC with microseconds, and the optional members (:data:`OPTIONAL_FIELDS`:
``arguments``) only when they have a value, so that a record without them hashes as it
always did. Its **hash** is::

    SHA-256( RFC 8785 canonical JSON of {"v": 1, "seq": seq, "prev": prev, "record": body} )

as lowercase hex, where ``prev`` is the hash of the record before it (:data:`GENESIS` for
the first). A **checkpoint** is a compact JWS (Ed25519 by default, ``typ``
:data:`CHECKPOINT_TYP`, ``kid`` the RFC 7638 thumbprint of the signing key) over
``{"iss", "seq", "hash", "time"}``: the head of the chain at that moment.

:func:`verify` walks records in order and reports the first problem and where it is:
``edited`` (a record's content no longer matches its hash), ``missing`` (a gap: the link
skips records), ``inserted`` (a record that is not linked to its predecessor), ``reordered``
(sequence numbers not increasing), ``truncated`` (the chain ends before a checkpoint's
head), ``checkpoint_mismatch`` (a checkpoint names a hash the record at its sequence does
not have), ``bad_checkpoint_signature``, ``malformed``.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import rfc8785

from taskbound.core import jws
from taskbound.core.keys import KeyRing, PrivateKey
from taskbound.core.model import AuditEvent

__all__ = [
    "CHECKPOINT_TYP",
    "FIELDS",
    "FORMAT_VERSION",
    "GENESIS",
    "OPTIONAL_FIELDS",
    "ChainRecord",
    "Checkpoint",
    "Problem",
    "Report",
    "body_of",
    "chain",
    "event_of",
    "record_hash",
    "sign_checkpoint",
    "verify",
    "verify_checkpoint",
]

FORMAT_VERSION: Final = 1
GENESIS: Final = "0" * 64
CHECKPOINT_TYP: Final = "taskbound-audit-checkpoint+jwt"
_TYP_RULE: Final = jws.TypRule(allowed=frozenset({CHECKPOINT_TYP}), required=True)

#: The fields of a record body, in the order the documentation lists them.
FIELDS: Final = (
    "time",
    "event",
    "decision",
    "code",
    "agent",
    "owner",
    "task",
    "intent",
    "txn",
    "jti",
    "tool",
    "action",
    "tier",
    "argument_digest",
    "policies",
    "policy_version",
    "exception_id",
    "latency_ms",
    "upstream_status",
    "detail",
)

#: Members a body holds only when they have a value (never as ``null``): the call's
#: arguments, for a tool configured to record them (already redacted).
OPTIONAL_FIELDS: Final = ("arguments",)


def _time(when: datetime) -> str:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def body_of(event: AuditEvent) -> dict[str, Any]:
    """The canonical body of ``event`` (what the hash covers)."""
    body: dict[str, Any] = {
        "time": _time(event.time),
        "event": event.event,
        "decision": event.decision,
        "code": event.code,
        "agent": event.agent,
        "owner": event.owner,
        "task": event.task,
        "intent": event.intent,
        "txn": event.txn,
        "jti": event.jti,
        "tool": event.tool,
        "action": event.action,
        "tier": event.tier,
        "argument_digest": event.argument_digest,
        "policies": list(event.policies),
        "policy_version": event.policy_version,
        "exception_id": event.exception_id,
        # Floats are kept to the microsecond so that every store gives back the same value.
        "latency_ms": None if event.latency_ms is None else round(float(event.latency_ms), 3),
        "upstream_status": event.upstream_status,
        "detail": event.detail,
    }
    # Only when recorded: every record without arguments keeps the body (and hash) it had.
    if event.arguments is not None:
        body["arguments"] = event.arguments
    return body


def _is_body_shape(body: Mapping[str, Any]) -> bool:
    """Exactly the fields of format 1, with or without each optional member."""
    return set(FIELDS).issubset(body) and set(body).issubset((*FIELDS, *OPTIONAL_FIELDS))


def event_of(body: Mapping[str, Any]) -> AuditEvent:
    """The event a body describes (``ValueError`` when it is not a body of this format)."""
    if not _is_body_shape(body):
        raise ValueError("not an audit record body of format 1")
    if "arguments" in body and body["arguments"] is None:
        # body_of never writes it so: a null here was put there, and would hash differently
        # from the record without the member that it reads back as.
        raise ValueError("arguments, when present, must not be null")
    try:
        when = datetime.strptime(str(body["time"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError("time is not RFC 3339 UTC with microseconds") from None
    policies = body["policies"]
    if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
        raise ValueError("policies must be a list of strings")
    return AuditEvent(
        time=when,
        event=body["event"],
        decision=body["decision"],
        code=body["code"],
        agent=body["agent"],
        owner=body["owner"],
        task=body["task"],
        intent=body["intent"],
        txn=body["txn"],
        jti=body["jti"],
        tool=body["tool"],
        action=body["action"],
        tier=body["tier"],
        argument_digest=body["argument_digest"],
        policies=tuple(policies),
        policy_version=body["policy_version"],
        exception_id=body["exception_id"],
        latency_ms=body["latency_ms"],
        upstream_status=body["upstream_status"],
        detail=body["detail"],
        arguments=body.get("arguments"),
    )


def record_hash(seq: int, prev: str, body: Mapping[str, Any]) -> str:
    """The hash of the record ``seq`` with predecessor hash ``prev`` and ``body``."""
    envelope: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "prev": prev,
        "record": dict(body),
    }
    return hashlib.sha256(rfc8785.dumps(envelope)).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """One record as stored or exported: its place in the chain and its body."""

    seq: int
    prev: str
    hash: str
    body: Mapping[str, Any]

    def line(self) -> dict[str, Any]:
        """The record as one JSON Lines object of an export."""
        return {
            "type": "record",
            "seq": self.seq,
            "prev": self.prev,
            "hash": self.hash,
            "record": dict(self.body),
        }


def chain(head_seq: int, head_hash: str, events: Iterable[AuditEvent]) -> list[ChainRecord]:
    """``events`` appended after the head ``(head_seq, head_hash)``: numbered from
    ``head_seq + 1``, each linked to the one before."""
    out = []
    seq, prev = head_seq, head_hash
    for event in events:
        seq += 1
        body = body_of(event)
        digest = record_hash(seq, prev, body)
        out.append(ChainRecord(seq, prev, digest, body))
        prev = digest
    return out


# --- checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that the chain's head was ``(seq, hash)`` at ``time``."""

    seq: int
    hash: str
    time: datetime
    issuer: str
    kid: str
    jws: str

    def line(self) -> dict[str, Any]:
        return {"type": "checkpoint", "seq": self.seq, "hash": self.hash, "jws": self.jws}


def sign_checkpoint(
    *, seq: int, head: str, time: datetime, issuer: str, key: PrivateKey
) -> Checkpoint:
    claims = {"iss": issuer, "seq": seq, "hash": head, "time": _time(time)}
    header = {"alg": key.alg, "kid": key.kid, "typ": CHECKPOINT_TYP}
    token = jws.sign_compact(header, claims, key)
    return Checkpoint(seq, head, time, issuer, key.kid, token)


def verify_checkpoint(
    token: str, *, keys: KeyRing, algorithms: Iterable[str], issuer: str | None = None
) -> Checkpoint:
    """The checkpoint a JWS states, its signature checked with ``keys`` (by ``kid``, never
    a key from the token); :class:`taskbound.core.jws.Rejected` when it does not verify."""
    parsed = jws.parse_compact(token, max_length=4096)
    _, kid = jws.verify_with_keyring(parsed, keys=keys, algorithms=tuple(algorithms), typ=_TYP_RULE)
    claims = jws.decode_claims(parsed)
    seq = claims.get("seq")
    head = claims.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise jws.Rejected("seq is not a non-negative integer")
    if not isinstance(head, str) or len(head) != 64:
        raise jws.Rejected("hash is not a SHA-256 hex digest")
    iss = jws.require_str(claims, "iss")
    if issuer is not None and iss != issuer:
        raise jws.Rejected("issuer mismatch")
    try:
        when = datetime.strptime(jws.require_str(claims, "time"), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise jws.Rejected("time is not RFC 3339 UTC") from None
    return Checkpoint(seq, head, when.replace(tzinfo=UTC), iss, kid, token)


# --- verification -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong, and where: the sequence number of the first record (or checkpoint)
    that does not hold."""

    kind: str
    seq: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class Report:
    records: int
    checkpoints: int
    first_seq: int | None
    last_seq: int | None
    head: str
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(
    records: Iterable[ChainRecord],
    checkpoints: Iterable[str] = (),
    *,
    keys: KeyRing | None = None,
    algorithms: Iterable[str] = ("EdDSA", "ES256"),
    start_prev: str = GENESIS,
    issuer: str | None = None,
) -> Report:
    """Check ``records`` (in the order given) and the checkpoint JWSs against them.

    ``start_prev`` is the hash the first record must link to (:data:`GENESIS` for a whole
    chain; an archive's last hash for the live store after it). Checkpoints need ``keys``;
    a checkpoint beyond the last record means the chain was cut (``truncated``).

    A problem's ``seq`` is the record where the walk stopped: the edited, inserted or
    out-of-place record, the one after a gap, the first record past the end for
    ``truncated``, the checkpoint's for ``checkpoint_mismatch``; ``None`` for a checkpoint
    whose signature fails and for a record without a usable seq. Never raises for what
    an edited export may hold (``malformed``).
    """
    algs = tuple(algorithms)
    checkpoints = list(checkpoints)
    # Only the hashes checkpoints may ask about are kept (memory: one entry per checkpoint,
    # whatever the chain's length). A checkpoint whose claimed seq cannot be read yet
    # (it fails its signature check below) needs none.
    wanted = {seq for seq in map(_claimed_seq, checkpoints) if seq is not None}
    count, first, last_seq, prev = 0, None, None, start_prev
    seen: dict[int, str] = {}
    remaining = iter(records)
    for record in remaining:
        recomputed, wrong = _recompute(record)
        if recomputed is None:
            seq = record.seq if _is_seq(record.seq) else None
            return _fail(count, first, last_seq, prev, "malformed", seq, wrong)
        if last_seq is not None and record.seq <= last_seq:
            return _fail(
                count,
                first,
                last_seq,
                prev,
                "reordered",
                record.seq,
                f"record {record.seq} comes after record {last_seq}",
            )
        if recomputed != record.hash:
            return _fail(
                count,
                first,
                last_seq,
                prev,
                "edited",
                record.seq,
                f"record {record.seq}'s content does not match its hash",
            )
        if record.prev != prev:
            kind, what = _broken_link(record, last_seq, start_prev, remaining)
            return _fail(count, first, last_seq, prev, kind, record.seq, what)
        count += 1
        first = record.seq if first is None else first
        last_seq, prev = record.seq, record.hash
        if record.seq in wanted:
            seen[record.seq] = record.hash
    signed = 0
    for token in checkpoints:
        if keys is None:
            return _fail(count, first, last_seq, prev, "bad_checkpoint_signature", None, "no keys")
        try:
            point = verify_checkpoint(token, keys=keys, algorithms=algs, issuer=issuer)
        except jws.Rejected as exc:
            return _fail(
                count, first, last_seq, prev, "bad_checkpoint_signature", None, str(exc), signed
            )
        signed += 1
        if last_seq is None or point.seq > last_seq:
            return _fail(
                count,
                first,
                last_seq,
                prev,
                "truncated",
                (last_seq or 0) + 1,
                f"a checkpoint signed the head at record {point.seq}; the chain ends at {last_seq}",
                signed,
            )
        if first is not None and point.seq < first:
            continue  # a checkpoint of an earlier segment (an archive)
        if seen.get(point.seq) != point.hash:
            return _fail(
                count,
                first,
                last_seq,
                prev,
                "checkpoint_mismatch",
                point.seq,
                f"record {point.seq} is not the one the checkpoint signed",
                signed,
            )
    return Report(count, signed, first, last_seq, prev)


def _claimed_seq(token: str) -> int | None:
    """The ``seq`` a checkpoint claims, read without checking it (only to know which
    record hashes to keep; :func:`verify_checkpoint` decides what it is worth)."""
    try:
        seq = jws.decode_claims(jws.parse_compact(token, max_length=4096)).get("seq")
    except (jws.Rejected, ValueError, TypeError):
        return None
    return seq if _is_seq(seq) else None


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _recompute(record: ChainRecord) -> tuple[str, str] | tuple[None, str]:
    """``(hash, "")`` for a well-formed record, ``(None, why)`` for one that is not a
    record of this format (whatever an export was edited into, never an exception)."""
    if not _is_seq(record.seq):
        return None, "seq is not a non-negative integer"
    if not isinstance(record.prev, str) or not isinstance(record.hash, str):
        return None, f"record {record.seq}: prev and hash must be strings"
    body = record.body
    if not isinstance(body, Mapping) or not _is_body_shape(body):
        return None, f"record {record.seq} is not a record of format {FORMAT_VERSION}"
    try:
        event_of(body)
        return record_hash(record.seq, record.prev, body), ""
    except (ValueError, TypeError) as exc:
        # rfc8785 refuses what JSON cannot carry exactly (NaN, huge integers...).
        return None, f"record {record.seq}: {exc}"


def _broken_link(
    record: ChainRecord, last_seq: int | None, start_prev: str, rest: Iterator[ChainRecord]
) -> tuple[str, str]:
    """Why ``record`` does not link to what came before: records between are further on
    (``reordered``), or absent (``missing``), or it is not the successor it claims to be
    (``inserted``). Reads the rest of the records only on this failure path."""
    # The start of a whole chain stands for record 0.
    before = last_seq if last_seq is not None else (0 if start_prev == GENESIS else None)
    floor = -1 if before is None else before
    later = [r.seq for r in rest if _is_seq(r.seq) and floor < r.seq < record.seq]
    if later:
        return "reordered", f"record {record.seq} comes before record {min(later)}"
    if before is not None and record.seq > before + 1:
        return "missing", f"records {before + 1}..{record.seq - 1} are missing"
    return "inserted", f"record {record.seq} does not link to its predecessor"


def _fail(
    count: int,
    first: int | None,
    last: int | None,
    head: str,
    kind: str,
    seq: int | None,
    detail: str,
    signed: int = 0,
) -> Report:
    return Report(count, signed, first, last, head, Problem(kind, seq, detail))
