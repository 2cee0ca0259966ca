"""The audit chain, format 1 (core/audit.py): the tamper matrix.

Every way of changing a chain someone might try — edit a field, drop, insert, swap or
replay a record, cut the tail, forge or swap a checkpoint — is detected, with the kind the
module documents and at the record where the walk stops (``Problem.seq``). Property tests:
any single-byte change to a JSON Lines export, and any change of one field, is detected at
the record it touched, and the verifier never raises whatever an export was edited into.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import rfc8785
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from taskbound.core import audit, jws
from taskbound.core.audit import FIELDS, GENESIS, OPTIONAL_FIELDS, ChainRecord, Report
from taskbound.core.keys import KeyRing, public_jwk
from taskbound.core.model import AuditEvent

from ._crypto import b64, b64json, forge, key

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ISSUER = "https://broker.example"
T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
KEY = key("EdDSA", 70)
OTHER = key("EdDSA", 71)
ES_KEY = key("ES256", 72)
# As a verifier holds them: built from the published (public) JWK Set.
RING = KeyRing.from_jwks({"keys": [public_jwk(KEY)]})
N = 12
# The record the single-record tampers aim at (its seq is K + 1).
K = 5


def full_event(i: int) -> AuditEvent:
    """Event ``i`` with every field set, each value its own."""
    return AuditEvent(
        time=T0 + timedelta(seconds=i, microseconds=i),
        event="gateway.call",
        decision="deny",
        code="policy_denied",
        agent="spiffe://taskbound.local/agents/bot",
        owner="alice",
        task=f"task-{i}",
        intent="merge the fix for the flaky test",
        jti=f"jti-{i}",
        tool="github",
        action="merge",
        tier="write",
        argument_digest="sha256:" + "ab" * 32,
        policies=("default/writes.cedar:12", "org/naïve ✓.cedar:3"),
        policy_version="pv-2026-01-01",
        latency_ms=12.345,
        upstream_status=503,
        detail=f"forbid: merge outside business hours ({i})",
        txn=f"txn-{i}",
        exception_id="bg-1",
    )


def bare_event(i: int) -> AuditEvent:
    return AuditEvent(time=T0 + timedelta(seconds=i), event="task.started", decision="info")


def events(n: int) -> list[AuditEvent]:
    return [full_event(i) if i % 4 != 3 else bare_event(i) for i in range(n)]


def make_chain(n: int = N) -> list[ChainRecord]:
    return audit.chain(0, GENESIS, events(n))


CHAIN = make_chain()


def checkpoint(records: Sequence[ChainRecord], seq: int, signer: Any = KEY) -> str:
    head = next(r.hash for r in records if r.seq == seq)
    return audit.sign_checkpoint(
        seq=seq, head=head, time=T0 + timedelta(hours=1), issuer=ISSUER, key=signer
    ).jws


def check(
    records: Iterable[ChainRecord],
    checkpoints: Iterable[str] = (),
    *,
    start_prev: str = GENESIS,
    keys: KeyRing | None = RING,
) -> Report:
    return audit.verify(
        records, checkpoints, keys=keys, algorithms=("EdDSA",), start_prev=start_prev
    )


def problem(report: Report) -> tuple[str, int | None]:
    assert report.problem is not None, report
    return report.problem.kind, report.problem.seq


def edited_body(record: ChainRecord, **changes: Any) -> ChainRecord:
    """``record`` with its body changed and its hash left alone (a plain edit)."""
    return replace(record, body={**record.body, **changes})


def rehashed(record: ChainRecord, *, prev: str | None = None, **changes: Any) -> ChainRecord:
    """``record`` changed and its own hash recomputed (an editor who knows the format)."""
    body = {**record.body, **changes}
    link = record.prev if prev is None else prev
    return ChainRecord(record.seq, link, audit.record_hash(record.seq, link, body), body)


def relinked(records: Sequence[ChainRecord], prev: str) -> list[ChainRecord]:
    """``records`` renumbered from where they are and every hash recomputed after ``prev``:
    a rewrite of the tail by someone who controls the whole store."""
    out = []
    for r in records:
        digest = audit.record_hash(r.seq, prev, r.body)
        out.append(ChainRecord(r.seq, prev, digest, r.body))
        prev = digest
    return out


# --- the format ---------------------------------------------------------------------------


def test_fields_are_exactly_the_audit_event() -> None:
    assert set(FIELDS) | set(OPTIONAL_FIELDS) == {f.name for f in fields(AuditEvent)}
    assert not set(FIELDS) & set(OPTIONAL_FIELDS)
    assert len(FIELDS) == len(set(FIELDS))
    assert tuple(audit.body_of(full_event(0))) == FIELDS


def test_body_of_the_documented_shape() -> None:
    when = datetime(2026, 3, 1, 10, 30, 0, 5, tzinfo=timezone(timedelta(hours=1)))
    body = audit.body_of(replace(full_event(0), time=when, latency_ms=12.345678))
    # RFC 3339 UTC with microseconds; the latency kept to the microsecond.
    assert body["time"] == "2026-03-01T09:30:00.000005Z"
    assert body["latency_ms"] == 12.346
    assert body["policies"] == ["default/writes.cedar:12", "org/naïve ✓.cedar:3"]
    bare = audit.body_of(bare_event(0))
    assert bare["policies"] == []
    assert {k for k, v in bare.items() if v is not None} == {
        "time",
        "event",
        "decision",
        "policies",
    }
    with pytest.raises(ValueError, match="timezone"):
        audit.body_of(replace(bare_event(0), time=datetime(2026, 3, 1)))


def test_body_round_trips_through_event_of() -> None:
    for event in (full_event(3), bare_event(4)):
        body = audit.body_of(event)
        assert audit.event_of(body) == event
        assert audit.body_of(audit.event_of(body)) == body
        # As an export carries it.
        assert audit.event_of(json.loads(json.dumps(body))) == event
    # Another zone is the same instant; the latency comes back as kept.
    ist = replace(full_event(0), time=T0.astimezone(timezone(timedelta(hours=5, minutes=30))))
    back = audit.event_of(audit.body_of(replace(ist, latency_ms=1.23456)))
    assert back == replace(ist, latency_ms=1.235)
    assert back.time.tzinfo is UTC


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({k: v for k, v in audit.body_of(bare_event(0)).items() if k != "detail"}, "format 1"),
        ({**audit.body_of(bare_event(0)), "extra": 1}, "format 1"),
        ({**audit.body_of(bare_event(0)), "time": "2026-03-01T09:30:00Z"}, "microseconds"),
        ({**audit.body_of(bare_event(0)), "time": "2026-03-01T09:30:00.000000+00:00"}, "RFC"),
        ({**audit.body_of(bare_event(0)), "time": 1772357400}, "RFC"),
        ({**audit.body_of(bare_event(0)), "policies": "p"}, "policies"),
        ({**audit.body_of(bare_event(0)), "policies": ["p", 1]}, "policies"),
    ],
)
def test_event_of_refuses_what_is_not_a_body(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        audit.event_of(body)


def test_record_hash_is_sha256_of_the_canonical_envelope() -> None:
    body = audit.body_of(bare_event(0))
    # Independent of rfc8785: for ASCII strings, integers and null, sorted compact JSON IS
    # the RFC 8785 form.
    text = json.dumps(
        {"prev": GENESIS, "record": body, "seq": 1, "v": 1}, sort_keys=True, separators=(",", ":")
    )
    expected = hashlib.sha256(text.encode()).hexdigest()
    assert audit.record_hash(1, GENESIS, body) == expected
    # Pinned: a change here is a new format version, not a refactoring.
    assert expected == "f9297fa9e446848f4941c6b5ab90399922e30e07035ed9c194cd01e74ba8fd06"
    # Every part of the envelope counts.
    assert audit.record_hash(2, GENESIS, body) != expected
    assert audit.record_hash(1, "1" * 64, body) != expected
    assert audit.record_hash(1, GENESIS, {**body, "detail": ""}) != expected


def test_chain_numbers_and_links() -> None:
    assert [r.seq for r in CHAIN] == list(range(1, N + 1))
    assert CHAIN[0].prev == GENESIS
    for before, after in itertools.pairwise(CHAIN):
        assert after.prev == before.hash
    for r in CHAIN:
        assert r.hash == audit.record_hash(r.seq, r.prev, r.body)
        assert len(r.hash) == 64
        assert int(r.hash, 16) >= 0
    # Appending after a head gives the same records as one chain of everything.
    head = CHAIN[K - 1]
    assert audit.chain(head.seq, head.hash, events(N)[K:]) == CHAIN[K:]
    assert audit.chain(3, "f" * 64, []) == []


def test_lines() -> None:
    record = CHAIN[0]
    assert record.line() == {
        "type": "record",
        "seq": 1,
        "prev": GENESIS,
        "hash": record.hash,
        "record": dict(record.body),
    }
    point = audit.sign_checkpoint(seq=3, head=CHAIN[2].hash, time=T0, issuer=ISSUER, key=KEY)
    assert point.line() == {"type": "checkpoint", "seq": 3, "hash": CHAIN[2].hash, "jws": point.jws}


# --- an untouched chain -------------------------------------------------------------------


def test_an_untouched_chain_verifies() -> None:
    many = make_chain(500)
    points = [checkpoint(many, s) for s in (1, 100, 250, 499, 500)]
    report = check(many, points)
    assert report.ok
    assert report.problem is None
    assert (report.records, report.checkpoints) == (500, 5)
    assert (report.first_seq, report.last_seq) == (1, 500)
    assert report.head == many[-1].hash


def test_an_empty_chain_verifies() -> None:
    report = check([])
    assert report.ok
    assert (report.records, report.first_seq, report.last_seq, report.head) == (
        0,
        None,
        None,
        GENESIS,
    )


def test_a_live_segment_verifies_from_its_pinned_checkpoint() -> None:
    """After records 1..K were archived, the rest links to the hash the checkpoint pinned;
    checkpoints of the archived segment are skipped, not failed."""
    points = [checkpoint(CHAIN, 2), checkpoint(CHAIN, K), checkpoint(CHAIN, N)]
    live = CHAIN[K:]
    report = check(live, points, start_prev=CHAIN[K - 1].hash)
    assert report.ok
    assert (report.records, report.checkpoints, report.first_seq) == (N - K, 3, K + 1)
    # Checked as a whole chain instead, the archived records are missing.
    report = check(live, points)
    assert problem(report) == ("missing", K + 1)
    assert report.problem is not None
    assert report.problem.detail == f"records 1..{K} are missing"


def test_a_chain_migrated_with_skipped_numbers_verifies() -> None:
    """Records numbered before the chain existed may skip numbers (a failed insert used
    one up): linked in order, they verify, and only a broken link is a gap."""
    seqs = [2, 3, 5, 9]
    prev, records = GENESIS, []
    for seq, event in zip(seqs, events(4), strict=True):
        body = audit.body_of(event)
        digest = audit.record_hash(seq, prev, body)
        records.append(ChainRecord(seq, prev, digest, body))
        prev = digest
    report = check(records, [checkpoint(records, 5), checkpoint(records, 9)])
    assert report.ok
    assert (report.records, report.first_seq, report.last_seq) == (4, 2, 9)


# --- records: the tamper matrix -----------------------------------------------------------

EDITS: dict[str, Any] = {
    "time": "2026-03-01T09:30:05.000006Z",
    "event": "task.started",
    "decision": "allow",
    "code": "approval_required",
    "agent": "spiffe://taskbound.local/agents/mallory",
    "owner": "mallory",
    "task": "task-forged",
    "intent": "merge the fix for the flaky test.",
    "txn": "txn-forged",
    "jti": "jti-forged",
    "tool": "deploy",
    "action": "release",
    "tier": "admin",
    "argument_digest": "sha256:" + "ab" * 31 + "ac",
    "policies": ["default/writes.cedar:12"],
    "policy_version": "pv-2026-01-02",
    "exception_id": None,
    "latency_ms": 12.346,
    "upstream_status": 200,
    "detail": "forbid: merge outside business hours (6)",
}
NULLABLE = [f for f in FIELDS if f not in ("time", "event", "decision", "policies")]


def test_every_field_has_an_edit() -> None:
    assert set(EDITS) == set(FIELDS)
    target = CHAIN[K].body
    assert all(EDITS[f] != target[f] for f in FIELDS)


@pytest.mark.parametrize("field", FIELDS)
def test_editing_one_field_is_detected_at_that_record(field: str) -> None:
    records = list(CHAIN)
    records[K] = edited_body(records[K], **{field: EDITS[field]})
    report = check(records)
    assert problem(report) == ("edited", K + 1)
    assert report.problem is not None
    assert report.problem.detail == f"record {K + 1}'s content does not match its hash"
    # What came before was checked and counted.
    assert (report.records, report.last_seq, report.head) == (K, K, CHAIN[K - 1].hash)


@pytest.mark.parametrize("field", NULLABLE)
def test_clearing_one_field_is_detected_at_that_record(field: str) -> None:
    records = list(CHAIN)
    records[K] = edited_body(records[K], **{field: None})
    assert problem(check(records)) == ("edited", K + 1)


@pytest.mark.parametrize(
    "change",
    [
        {"seq": K + 2},
        {"prev": "0" * 63 + "1"},
        {"hash": "0" * 64},
        {"hash": CHAIN[K].hash.upper()},
    ],
    ids=["seq", "prev", "hash", "hash-uppercase"],
)
def test_editing_the_envelope_is_detected_at_that_record(change: dict[str, Any]) -> None:
    records = list(CHAIN)
    records[K] = replace(records[K], **change)
    assert problem(check(records)) == ("edited", change.get("seq", K + 1))


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link() -> None:
    records = list(CHAIN)
    records[K] = rehashed(records[K], detail="nothing happened")
    # The record itself is consistent; its successor no longer links to it.
    assert problem(check(records)) == ("inserted", K + 2)
    # At the head there is no successor: only a checkpoint catches it.
    tail = list(CHAIN)
    tail[-1] = rehashed(tail[-1], decision="allow")
    assert check(tail).ok
    assert problem(check(tail, [checkpoint(CHAIN, N)])) == ("checkpoint_mismatch", N)


def test_a_rewritten_tail_is_caught_by_the_first_checkpoint_it_covers() -> None:
    """Someone who controls the store edits record K+1 and recomputes every hash after it:
    the links hold, the signed heads do not."""
    forged = [rehashed(CHAIN[K], detail="nothing happened")]
    forged += relinked(CHAIN[K + 1 :], forged[0].hash)
    records = CHAIN[:K] + forged
    assert check(records).ok
    points = [checkpoint(CHAIN, s) for s in (2, K, K + 3, N)]
    assert problem(check(records, points)) == ("checkpoint_mismatch", K + 3)
    # A checkpoint before the edit still holds.
    assert check(records, points[:2]).ok


def test_deleting_a_record_in_the_middle_is_missing_at_the_next() -> None:
    records = CHAIN[:K] + CHAIN[K + 1 :]
    report = check(records)
    assert problem(report) == ("missing", K + 2)
    assert report.problem is not None
    assert report.problem.detail == f"records {K + 1}..{K + 1} are missing"
    assert (report.records, report.last_seq) == (K, K)


def test_deleting_several_records_is_missing_at_the_next() -> None:
    records = CHAIN[:3] + CHAIN[8:]
    report = check(records)
    assert problem(report) == ("missing", 9)
    assert report.problem is not None
    assert report.problem.detail == "records 4..8 are missing"


def test_deleting_the_first_record_is_missing_at_the_second() -> None:
    report = check(CHAIN[1:])
    assert problem(report) == ("missing", 2)
    assert report.problem is not None
    assert report.problem.detail == "records 1..1 are missing"
    assert (report.records, report.first_seq) == (0, None)


def test_deleting_the_last_records_is_truncated_when_a_checkpoint_covers_them() -> None:
    # Without a checkpoint past the cut, a shorter chain is just a shorter chain...
    assert check(CHAIN[:-3]).ok
    # ... with one, the first record after the cut is what is missing.
    report = check(CHAIN[:-3], [checkpoint(CHAIN, 4), checkpoint(CHAIN, N)])
    assert problem(report) == ("truncated", N - 2)
    assert report.problem is not None
    assert (
        report.problem.detail
        == f"a checkpoint signed the head at record {N}; the chain ends at {N - 3}"
    )
    assert (report.records, report.checkpoints) == (N - 3, 2)
    # Everything cut: the first record is missing.
    assert problem(check([], [checkpoint(CHAIN, 3)])) == ("truncated", 1)


def test_an_unlinked_forged_record_is_inserted() -> None:
    forged = rehashed(CHAIN[K], prev="e" * 64, detail="forged")
    records = [*CHAIN[:K], forged, *CHAIN[K:]]
    assert problem(check(records)) == ("inserted", K + 1)
    # The same at the very start of the chain.
    first = rehashed(CHAIN[0], prev="e" * 64)
    assert problem(check([first, *CHAIN])) == ("inserted", 1)


def test_a_linked_forged_record_collides_with_the_one_it_displaces() -> None:
    """A forgery that links correctly must take a number: the next genuine record then
    comes after a record with its own number."""
    forged = rehashed(CHAIN[K], prev=CHAIN[K - 1].hash, decision="allow", detail="forged")
    records = [*CHAIN[:K], forged, *CHAIN[K:]]
    report = check(records)
    assert problem(report) == ("reordered", K + 1)
    assert report.problem is not None
    assert report.problem.detail == f"record {K + 1} comes after record {K + 1}"
    # Renumbering everything after it needs every hash recomputed: a checkpoint catches it.
    renumbered = [replace(r, seq=r.seq + 1) for r in CHAIN[K:]]
    rewritten = [*CHAIN[:K], forged, *relinked(renumbered, forged.hash)]
    assert check(rewritten).ok
    assert problem(check(rewritten, [checkpoint(CHAIN, N)])) == ("checkpoint_mismatch", N)


def test_swapping_two_neighbours_is_reordered() -> None:
    records = list(CHAIN)
    records[K], records[K + 1] = records[K + 1], records[K]
    report = check(records)
    assert problem(report) == ("reordered", K + 2)
    assert report.problem is not None
    assert report.problem.detail == f"record {K + 2} comes before record {K + 1}"


def test_swapping_two_distant_records_is_reordered() -> None:
    records = list(CHAIN)
    records[2], records[9] = records[9], records[2]
    assert problem(check(records)) == ("reordered", 10)


def test_moving_a_record_later_is_reordered() -> None:
    records = list(CHAIN)
    moved = records.pop(K)
    records.insert(K + 3, moved)
    report = check(records)
    assert problem(report) == ("reordered", K + 2)
    assert report.problem is not None
    assert report.problem.detail == f"record {K + 2} comes before record {K + 1}"


def test_moving_the_first_record_later_is_reordered() -> None:
    records = list(CHAIN)
    records.insert(4, records.pop(0))
    assert problem(check(records)) == ("reordered", 2)


def test_a_replayed_record_is_reordered() -> None:
    records = [*CHAIN[: K + 1], CHAIN[K - 2], *CHAIN[K + 1 :]]
    report = check(records)
    assert problem(report) == ("reordered", K - 1)
    assert report.problem is not None
    assert report.problem.detail == f"record {K - 1} comes after record {K + 1}"
    assert problem(check([*CHAIN, CHAIN[-1]])) == ("reordered", N)


def test_records_of_another_chain_do_not_link() -> None:
    other = audit.chain(0, GENESIS, [replace(e, owner="bob") for e in events(N)])
    assert problem(check(CHAIN[:K] + other[K:])) == ("inserted", K + 1)


@pytest.mark.parametrize(
    ("change", "seq"),
    [
        ({"body": {k: v for k, v in CHAIN[K].body.items() if k != "detail"}}, K + 1),
        ({"body": {**CHAIN[K].body, "signature": "x"}}, K + 1),
        ({"body": ["not", "a", "mapping"]}, K + 1),
        ({"body": {**CHAIN[K].body, "time": "yesterday"}}, K + 1),
        ({"body": {**CHAIN[K].body, "policies": "all"}}, K + 1),
        ({"body": {**CHAIN[K].body, "latency_ms": float("nan")}}, K + 1),
        ({"body": {**CHAIN[K].body, "latency_ms": float("inf")}}, K + 1),
        ({"body": {**CHAIN[K].body, "upstream_status": 2**60}}, K + 1),
        ({"body": {**CHAIN[K].body, "detail": b"bytes"}}, K + 1),
        ({"body": {**CHAIN[K].body, "tier": {1: "a"}}}, K + 1),
        ({"seq": "6"}, None),
        ({"seq": -1}, None),
        ({"seq": True}, None),
        ({"seq": None}, None),
        ({"prev": None}, K + 1),
        ({"hash": 7}, K + 1),
    ],
    ids=[
        "field-missing",
        "field-extra",
        "not-a-mapping",
        "bad-time",
        "bad-policies",
        "nan",
        "infinity",
        "huge-integer",
        "bytes",
        "non-string-key",
        "seq-string",
        "seq-negative",
        "seq-bool",
        "seq-null",
        "prev-null",
        "hash-number",
    ],
)
def test_a_malformed_record_is_reported_not_raised(change: dict[str, Any], seq: int | None) -> None:
    records = list(CHAIN)
    records[K] = replace(records[K], **change)
    report = check(records)
    assert problem(report) == ("malformed", seq)
    assert report.records == K


def test_a_malformed_record_further_on_does_not_hide_a_gap() -> None:
    records = CHAIN[:K] + CHAIN[K + 1 :]
    records[-1] = replace(records[-1], seq="x")  # type: ignore[arg-type]
    assert problem(check(records)) == ("missing", K + 2)


# --- recorded arguments (the optional member) ---------------------------------------------

ARGUMENTS: dict[str, Any] = {
    "project": "WEB",
    "password": "[redacted]",
    "items": [{"note": "first", "qty": 2}, {"note": "[redacted]", "price": 9.99}],
    "flags": {"dry_run": False, "nothing": None},
}


def with_arguments(n: int = N, at: Sequence[int] = (K, K + 2)) -> list[ChainRecord]:
    """A chain whose records at the indexes ``at`` carry arguments (the others none)."""
    made = [
        replace(e, arguments={**ARGUMENTS, "n": i}) if i in at else e
        for i, e in enumerate(events(n))
    ]
    return audit.chain(0, GENESIS, made)


ARGS_CHAIN = with_arguments()


def test_arguments_are_in_the_body_only_when_recorded() -> None:
    event = replace(full_event(0), arguments=ARGUMENTS)
    body = audit.body_of(event)
    assert tuple(body) == (*FIELDS, "arguments")
    assert body["arguments"] == ARGUMENTS
    # Without them the body is exactly the 20 fields: records made before keep their hash.
    assert tuple(audit.body_of(full_event(0))) == FIELDS
    assert "arguments" not in audit.body_of(replace(full_event(0), arguments=None))
    # Falsy values are values: recorded.
    for value in ({}, [], "", 0, False):
        assert audit.body_of(replace(bare_event(0), arguments=value))["arguments"] == value


def test_a_record_without_arguments_hashes_as_before() -> None:
    """The pinned hash of format 1 (test_record_hash_is_sha256_of_the_canonical_envelope)
    holds for an event that has the field but no value."""
    body = audit.body_of(replace(bare_event(0), arguments=None))
    assert audit.record_hash(1, GENESIS, body) == (
        "f9297fa9e446848f4941c6b5ab90399922e30e07035ed9c194cd01e74ba8fd06"
    )
    assert audit.record_hash(1, GENESIS, {**body, "arguments": {}}) != audit.record_hash(
        1, GENESIS, body
    )


def test_arguments_round_trip_through_event_of() -> None:
    event = replace(full_event(2), arguments=ARGUMENTS)
    body = audit.body_of(event)
    assert audit.event_of(body) == event
    assert audit.body_of(audit.event_of(body)) == body
    assert audit.event_of(json.loads(json.dumps(body))) == event
    assert audit.event_of(audit.body_of(full_event(2))).arguments is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({**audit.body_of(bare_event(0)), "arguments": None}, "must not be null"),
        ({**audit.body_of(bare_event(0)), "arguments": {}, "extra": 1}, "format 1"),
    ],
)
def test_event_of_refuses_a_bad_arguments_member(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        audit.event_of(body)


def test_a_chain_with_arguments_verifies() -> None:
    assert [("arguments" in r.body) for r in ARGS_CHAIN].count(True) == 2
    report = check(ARGS_CHAIN, [checkpoint(ARGS_CHAIN, N)])
    assert report.ok, report.problem
    assert (report.records, report.last_seq) == (N, N)
    records, points = read_export(export(ARGS_CHAIN, [checkpoint(ARGS_CHAIN, N)]))
    assert records == ARGS_CHAIN
    assert check(records, points).ok


@pytest.mark.parametrize(
    "arguments",
    [
        {**ARGUMENTS, "project": "PAYROLL"},
        {**ARGUMENTS, "password": "hunter2"},
        {**ARGUMENTS, "items": [{"note": "first", "qty": 3}, ARGUMENTS["items"][1]]},
        {**ARGUMENTS, "flags": {"dry_run": True, "nothing": None}},
        {k: v for k, v in ARGUMENTS.items() if k != "flags"},
        {**ARGUMENTS, "added": 1},
        "[redacted]",
        {"truncated": True, "bytes": 5000},
    ],
    ids=["value", "unredacted", "nested", "bool", "member-dropped", "member-added", "str", "cut"],
)
def test_editing_one_argument_is_detected_at_that_record(arguments: Any) -> None:
    records = list(ARGS_CHAIN)
    records[K] = edited_body(records[K], arguments=arguments)
    report = check(records)
    assert problem(report) == ("edited", K + 1)
    assert (report.records, report.head) == (K, ARGS_CHAIN[K - 1].hash)


def test_adding_or_removing_the_arguments_member_is_an_edit() -> None:
    removed = list(ARGS_CHAIN)
    removed[K] = replace(
        removed[K], body={k: v for k, v in removed[K].body.items() if k != "arguments"}
    )
    assert problem(check(removed)) == ("edited", K + 1)
    added = list(ARGS_CHAIN)
    added[K + 1] = edited_body(added[K + 1], arguments={"project": "WEB"})
    assert problem(check(added)) == ("edited", K + 2)


@pytest.mark.parametrize(
    "arguments",
    [None, float("nan"), {"n": 2**60}, {"b": b"bytes"}, {1: "x"}],
    ids=["null", "nan", "huge-integer", "bytes", "non-string-key"],
)
def test_an_arguments_member_json_cannot_carry_is_malformed(arguments: Any) -> None:
    records = list(ARGS_CHAIN)
    records[K] = edited_body(records[K], arguments=arguments)
    report = check(records)
    assert problem(report) == ("malformed", K + 1)
    assert report.records == K


# What RFC 8785 carries exactly: what the gateway records (core/redact.py) always is.
recordable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@FAST
@given(value=recordable)
def test_any_change_of_the_arguments_is_detected_at_its_record(value: Any) -> None:
    original = ARGS_CHAIN[K].body["arguments"]
    # The same value in another spelling (1 and 1.0, -0.0 and 0) is not a change.
    assume(value is None or _canonical(value) != _canonical(original))
    records = list(ARGS_CHAIN)
    records[K] = edited_body(records[K], arguments=value)
    report = check(records, [checkpoint(ARGS_CHAIN, N)])
    assert report.problem is not None
    assert report.problem.seq == K + 1
    assert report.problem.kind == ("malformed" if value is None else "edited")


@FAST
@given(value=recordable.filter(lambda v: v is not None))
def test_recorded_arguments_round_trip_and_verify(value: Any) -> None:
    event = replace(bare_event(0), arguments=value)
    body = audit.body_of(event)
    back = audit.event_of(json.loads(json.dumps(body)))
    assert audit.body_of(back) == body
    (record,) = audit.chain(0, GENESIS, [event])
    assert check(read_export(export([record]))[0]).ok


# --- checkpoints --------------------------------------------------------------------------


def test_a_checkpoint_verifies_and_states_the_head() -> None:
    point = audit.sign_checkpoint(seq=N, head=CHAIN[-1].hash, time=T0, issuer=ISSUER, key=KEY)
    assert (point.seq, point.hash, point.time, point.issuer, point.kid) == (
        N,
        CHAIN[-1].hash,
        T0,
        ISSUER,
        KEY.kid,
    )
    back = audit.verify_checkpoint(point.jws, keys=RING, algorithms=["EdDSA"], issuer=ISSUER)
    assert back == point
    parsed = jws.parse_compact(point.jws, max_length=4096)
    assert parsed.header == {"alg": "EdDSA", "kid": KEY.kid, "typ": audit.CHECKPOINT_TYP}
    claims = jws.decode_claims(parsed)
    assert claims == {
        "iss": ISSUER,
        "seq": N,
        "hash": CHAIN[-1].hash,
        "time": "2026-03-01T09:30:00.000000Z",
    }
    # ES256 keys sign checkpoints too.
    es = audit.sign_checkpoint(seq=1, head=CHAIN[0].hash, time=T0, issuer=ISSUER, key=ES_KEY)
    ring = KeyRing.from_jwks({"keys": [public_jwk(ES_KEY)]})
    assert audit.verify_checkpoint(es.jws, keys=ring, algorithms=["ES256"]).seq == 1


def test_a_checkpoint_with_a_wrong_hash_is_a_mismatch_at_its_seq() -> None:
    wrong = audit.sign_checkpoint(seq=K, head=CHAIN[K].hash, time=T0, issuer=ISSUER, key=KEY)
    report = check(CHAIN, [checkpoint(CHAIN, 2), wrong.jws, checkpoint(CHAIN, N)])
    assert problem(report) == ("checkpoint_mismatch", K)
    assert report.problem is not None
    assert report.problem.detail == f"record {K} is not the one the checkpoint signed"
    assert (report.records, report.checkpoints) == (N, 2)


def test_a_checkpoint_signed_by_another_key_is_refused() -> None:
    report = check(CHAIN, [checkpoint(CHAIN, N, signer=OTHER)])
    assert problem(report) == ("bad_checkpoint_signature", None)
    assert report.problem is not None
    assert report.problem.detail == "unknown kid"


def test_a_checkpoint_with_a_swapped_kid_is_refused() -> None:
    """Signed by another key under the trusted key's kid."""
    claims = {
        "iss": ISSUER,
        "seq": N,
        "hash": CHAIN[-1].hash,
        "time": "2026-03-01T09:30:00.000000Z",
    }
    header = {"alg": "EdDSA", "kid": KEY.kid, "typ": audit.CHECKPOINT_TYP}
    token = jws.sign_compact(header, claims, OTHER)
    report = check(CHAIN, [token])
    assert problem(report) == ("bad_checkpoint_signature", None)
    assert report.problem is not None
    assert report.problem.detail == "bad signature"


def checkpoint_claims(**changes: Any) -> dict[str, Any]:
    claims = {
        "iss": ISSUER,
        "seq": N,
        "hash": CHAIN[-1].hash,
        "time": "2026-03-01T09:30:00.000000Z",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def header(**changes: Any) -> dict[str, Any]:
    values = {"alg": "EdDSA", "kid": KEY.kid, "typ": audit.CHECKPOINT_TYP}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


FORGED = {
    "alg-none": f"{b64json(header(alg='none'))}.{b64json(checkpoint_claims())}.{b64(b'x')}",
    "alg-none-unsigned": f"{b64json(header(alg='none'))}.{b64json(checkpoint_claims())}.",
    "alg-none-lowercase-kid-of-other": (
        f"{b64json(header(alg='NONE', kid=OTHER.kid))}.{b64json(checkpoint_claims())}.{b64(b'x')}"
    ),
    "key-in-jwk-header": forge(
        header(kid=OTHER.kid, jwk=public_jwk(OTHER)), checkpoint_claims(), OTHER, "EdDSA"
    ),
    "trusted-kid-with-jwk-header": forge(
        header(jwk=public_jwk(OTHER)), checkpoint_claims(), OTHER, "EdDSA"
    ),
    "jku-header": forge(
        header(jku="https://evil.example/jwks.json"), checkpoint_claims(), KEY, "EdDSA"
    ),
    "x5c-header": forge(header(x5c=["MIIB"]), checkpoint_claims(), KEY, "EdDSA"),
    "crit-header": forge(header(crit=["exp"]), checkpoint_claims(), KEY, "EdDSA"),
    "wrong-typ": forge(header(typ="JWT"), checkpoint_claims(), KEY, "EdDSA"),
    "no-typ": forge(header(typ=None), checkpoint_claims(), KEY, "EdDSA"),
    "no-kid": forge(header(kid=None), checkpoint_claims(), KEY, "EdDSA"),
    "alg-not-allowed": forge(
        header(alg="ES256", kid=ES_KEY.kid), checkpoint_claims(), ES_KEY, "ES256"
    ),
    "seq-negative": forge(header(), checkpoint_claims(seq=-1), KEY, "EdDSA"),
    "seq-bool": forge(header(), checkpoint_claims(seq=True), KEY, "EdDSA"),
    "seq-string": forge(header(), checkpoint_claims(seq="12"), KEY, "EdDSA"),
    "hash-short": forge(header(), checkpoint_claims(hash="abc"), KEY, "EdDSA"),
    "no-iss": forge(header(), {**checkpoint_claims(), "iss": ""}, KEY, "EdDSA"),
    "bad-time": forge(header(), checkpoint_claims(time="yesterday"), KEY, "EdDSA"),
    "payload-not-json": forge(header(), b"\xff", KEY, "EdDSA"),
    "not-a-jws": "not.a.jws",
    "too-long": forge(header(), checkpoint_claims(pad="x" * 4096), KEY, "EdDSA"),
}


@pytest.mark.parametrize("name", FORGED)
def test_a_forged_checkpoint_is_a_bad_signature(name: str) -> None:
    token = FORGED[name]
    report = check(CHAIN, [checkpoint(CHAIN, 3), token])
    assert problem(report) == ("bad_checkpoint_signature", None)
    # The one before it counted.
    assert report.checkpoints == 1
    with pytest.raises(jws.Rejected):
        audit.verify_checkpoint(token, keys=RING, algorithms=["EdDSA"])


def test_a_checkpoint_of_another_issuer_is_refused_when_the_issuer_is_pinned() -> None:
    elsewhere = audit.sign_checkpoint(
        seq=N, head=CHAIN[-1].hash, time=T0, issuer="https://other.example", key=KEY
    ).jws
    assert check(CHAIN, [elsewhere]).ok
    report = audit.verify(CHAIN, [elsewhere], keys=RING, algorithms=["EdDSA"], issuer=ISSUER)
    assert problem(report) == ("bad_checkpoint_signature", None)


def test_checkpoints_without_keys_are_not_trusted() -> None:
    assert problem(check(CHAIN, [checkpoint(CHAIN, N)], keys=None)) == (
        "bad_checkpoint_signature",
        None,
    )
    assert check(CHAIN, [], keys=None).ok


def test_a_retiring_key_still_verifies_its_checkpoints() -> None:
    ring = KeyRing.from_jwks({"keys": [public_jwk(KEY), public_jwk(OTHER)]})
    points = [checkpoint(CHAIN, 4), checkpoint(CHAIN, N, signer=OTHER)]
    report = audit.verify(CHAIN, points, keys=ring, algorithms=["EdDSA"])
    assert (report.ok, report.checkpoints) == (True, 2)


# --- property tests -----------------------------------------------------------------------


def export(records: Sequence[ChainRecord], points: Sequence[str] = ()) -> list[str]:
    """JSON Lines as ``GET /v1/admin/audit/export`` writes them."""
    lines = [json.dumps(r.line(), separators=(",", ":")) for r in records]
    for token in points:
        claims = jws.decode_claims(jws.parse_compact(token, max_length=4096))
        line = {"type": "checkpoint", "seq": claims["seq"], "hash": claims["hash"], "jws": token}
        lines.append(json.dumps(line, separators=(",", ":")))
    return lines


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate member")
    return dict(pairs)


def read_export(lines: Iterable[str | bytes]) -> tuple[list[ChainRecord], list[str]]:
    """An export read back as a verifier would: records and checkpoint JWSs. ValueError
    for a line that is not one of the two."""
    records: list[ChainRecord] = []
    points: list[str] = []
    for raw in lines:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        line = json.loads(text, object_pairs_hook=_no_duplicates)
        if not isinstance(line, dict):
            raise ValueError("not an object")
        if line.get("type") == "record" and set(line) == {"type", "seq", "prev", "hash", "record"}:
            records.append(ChainRecord(line["seq"], line["prev"], line["hash"], line["record"]))
        elif line.get("type") == "checkpoint" and set(line) == {"type", "seq", "hash", "jws"}:
            points.append(line["jws"])
        else:
            raise ValueError("neither a record nor a checkpoint")
    return records, points


SMALL = make_chain(6)
SMALL_POINTS = [checkpoint(SMALL, 3), checkpoint(SMALL, 6)]
SMALL_LINES = export(SMALL)


def test_an_export_reads_back_and_verifies() -> None:
    records, points = read_export(export(SMALL, SMALL_POINTS))
    assert records == SMALL
    assert points == SMALL_POINTS
    assert check(records, points).ok


@FAST
@given(st.data())
def test_any_single_byte_change_to_an_export_is_detected_at_its_record(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(SMALL_LINES) - 1), label="line")
    raw = bytearray(SMALL_LINES[index].encode())
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="byte")
    raw[position] = byte
    lines: list[str | bytes] = list(SMALL_LINES)
    lines[index] = bytes(raw)
    try:
        records, _ = read_export(lines)
    except ValueError:
        return  # the reader refuses the line (JSON, UTF-8 or shape): detected
    tampered = records[index]
    assume(tampered != SMALL[index])  # e.g. "\u00ef" -> "\u00EF": the same text
    report = check(records, SMALL_POINTS)
    assert not report.ok
    expected = tampered.seq if usable_seq(tampered.seq) else None
    assert report.problem is not None
    assert report.problem.seq == expected, (report.problem, tampered)
    assert report.problem.kind in {"edited", "malformed", "reordered"}


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def usable_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _canonical(value: Any) -> bytes | None:
    try:
        return rfc8785.dumps(value)
    except (ValueError, TypeError):
        return None


@FAST
@given(
    index=st.integers(0, N - 1),
    field=st.sampled_from(FIELDS),
    value=json_values,
)
def test_any_change_of_one_field_is_detected_at_its_record(
    index: int, field: str, value: Any
) -> None:
    original = CHAIN[index].body[field]
    canonical = _canonical(value)
    # The same value in another spelling (1 and 1.0, -0.0 and 0) is not a change.
    assume(canonical is None or canonical != _canonical(original))
    records = list(CHAIN)
    records[index] = edited_body(records[index], **{field: value})
    report = check(records, [checkpoint(CHAIN, N)])
    assert report.problem is not None
    assert report.problem.seq == index + 1
    assert report.problem.kind in {"edited", "malformed"}
    assert report.records == index


@FAST
@given(
    st.lists(st.sampled_from(range(N)), max_size=N + 2).filter(
        lambda order: order != list(range(N))
    )
)
def test_any_other_order_or_selection_is_detected(order: list[int]) -> None:
    """Any sequence of the chain's records but the chain itself fails, given a checkpoint
    of the head."""
    records = [CHAIN[i] for i in order]
    assert not check(records, [checkpoint(CHAIN, N)]).ok


@FAST
@given(st.lists(st.sampled_from(range(N)), unique=True, min_size=1, max_size=N - 1))
def test_any_deletion_is_detected(dropped: list[int]) -> None:
    records = [r for i, r in enumerate(CHAIN) if i not in dropped]
    report = check(records, [checkpoint(CHAIN, N)])
    assert report.problem is not None
    first = min(dropped)
    if first == N - 1 or all(i in dropped for i in range(first, N)):
        assert problem(report) == ("truncated", first + 1)
    else:
        following = next(i for i in range(first, N) if i not in dropped)
        assert problem(report) == ("missing", following + 1)


events_strategy = st.builds(
    AuditEvent,
    time=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.just(UTC),
    ),
    event=st.text(max_size=10),
    decision=st.sampled_from(["allow", "deny", "approval_required", "error", "info"]),
    code=st.none() | st.text(max_size=10),
    detail=st.none() | st.text(max_size=30),
    policies=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    latency_ms=st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False),
    upstream_status=st.none() | st.integers(-(2**31), 2**31 - 1),
)


@FAST
@given(events_strategy)
def test_body_of_and_event_of_round_trip(event: AuditEvent) -> None:
    body = audit.body_of(event)
    assert tuple(body) == FIELDS
    back = audit.event_of(json.loads(json.dumps(body)))
    assert audit.body_of(back) == body
    expected_latency = None if event.latency_ms is None else round(event.latency_ms, 3)
    assert back == replace(event, latency_ms=expected_latency)
    (record,) = audit.chain(0, GENESIS, [event])
    assert check([record]).ok
    assert check(read_export(export([record]))[0]).ok
