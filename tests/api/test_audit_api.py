"""The audit trail over the admin API (docs/audit-format.md), on SQLite and PostgreSQL:
filtered listing, JSON Lines and OCSF export, checkpoints, and verification of the live
store — including after someone with write access to the database changed it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, delete, update
from sqlalchemy.pool import NullPool

from taskbound.core import audit
from taskbound.core.audit import GENESIS, ChainRecord
from taskbound.core.keys import KeyRing
from taskbound.core.model import AuditEvent, KeyPurpose
from taskbound.service import audit_chain
from taskbound.storage import schema as t
from taskbound.storage.urls import parse_database_url
from tests.core._crypto import key
from tests.core.test_audit_chain import read_export

from .conftest import AGENT, Live

PATHS = (
    ("GET", "/v1/admin/audit"),
    ("GET", "/v1/admin/audit/export"),
    ("GET", "/v1/admin/audit/verify"),
    ("GET", "/v1/admin/audit/checkpoints"),
    ("POST", "/v1/admin/audit/checkpoints"),
)
OTHER_AGENT = "spiffe://taskbound.local/agents/other"


@contextlib.contextmanager
def database(live: Live) -> Iterator[Connection]:
    """A connection of its own to the server's database, as its operator (or an intruder)
    would open one; committed at the end."""
    url = parse_database_url(live.services.settings.storage_url).sync_url
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


async def traffic(live: Live) -> None:
    """Records of a real task: started, credentials issued, ended."""
    agent = await live.agent()
    r = await agent.start()
    assert r.status_code == 201, r.text
    r = await agent.call("POST", f"/v1/tasks/{r.json()['id']}/complete")
    assert r.status_code == 200, r.text


def later(live: Live) -> datetime:
    """A day ahead of the server's clock: only the records made for a test are there."""
    return live.clock.now() + timedelta(days=1)


def marked_events(start: datetime) -> list[AuditEvent]:
    call = AuditEvent(
        time=start,
        event="gateway.call",
        decision="allow",
        agent=AGENT,
        owner="olga",
        task="t-a",
        tool="tool-a",
        txn="x-1",
        action="list",
        tier="read",
        latency_ms=3.25,
        upstream_status=200,
        policies=("default/reads.cedar:3",),
    )
    return [
        call,
        replace(
            call,
            time=start + timedelta(seconds=1),
            decision="deny",
            code="policy_denied",
            tool="tool-b",
            exception_id="bg-9",
            upstream_status=None,
            detail="forbid: tool-b on weekends",
        ),
        replace(
            call,
            time=start + timedelta(seconds=2),
            event="token.exchange",
            agent=OTHER_AGENT,
            task="t-b",
            txn="x-2",
        ),
        replace(
            call,
            time=start + timedelta(seconds=3),
            event="approval.requested",
            decision="approval_required",
            agent=OTHER_AGENT,
            owner="pete",
            task="t-b",
            txn="x-2",
            exception_id="bg-9",
        ),
        AuditEvent(
            time=start + timedelta(seconds=4),
            event="task.ended",
            decision="info",
            agent=AGENT,
            owner="pete",
            task="t-a",
        ),
    ]


async def listed(live: Live, **params: Any) -> list[int]:
    r = await live.http.get("/v1/admin/audit", params=params, headers=live.admin)
    assert r.status_code == 200, r.text
    return [record["seq"] for record in r.json()["records"]]


async def verify(live: Live) -> dict[str, Any]:
    r = await live.http.get("/v1/admin/audit/verify", headers=live.admin)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return dict(r.json())


async def take_checkpoint(live: Live) -> dict[str, Any]:
    r = await live.http.post("/v1/admin/audit/checkpoints", headers=live.admin)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def export(live: Live, **params: Any) -> list[str]:
    r = await live.http.get("/v1/admin/audit/export", params=params, headers=live.admin)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert r.headers["cache-control"] == "no-store"
    assert r.text.endswith("\n")
    return r.text.splitlines()


async def published_keys(live: Live) -> KeyRing:
    r = await live.http.get("/.well-known/audit-jwks.json")
    assert r.status_code == 200
    return KeyRing.from_jwks(r.json())


async def chain(live: Live) -> list[ChainRecord]:
    return await live.services.storage.list_chain(limit=100_000)


# --- access -------------------------------------------------------------------------------


async def test_the_audit_api_requires_an_admin_token(live: Live) -> None:
    identity = await live.identity()
    for method, path in PATHS:
        for headers in (
            {},
            {"Authorization": "Bearer tbat_forged"},
            {"Authorization": f"Bearer {identity}"},
        ):
            r = await live.http.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["code"] == "invalid_admin_token"
    # Nothing was signed on the way.
    assert await live.services.storage.list_checkpoints() == []
    # The keys that verify checkpoints are public.
    r = await live.http.get("/.well-known/audit-jwks.json")
    assert r.status_code == 200
    (jwk,) = r.json()["keys"]
    assert jwk["kid"] == live.services.keys.signer(KeyPurpose.AUDIT).kid
    assert set(jwk) >= {"kty", "kid", "alg", "use"}
    assert "d" not in jwk


# --- listing ------------------------------------------------------------------------------


async def test_list_with_each_filter(live: Live) -> None:
    await traffic(live)
    start = later(live)
    made = await live.services.storage.append_audits(marked_events(start))
    s = dict(enumerate(made, start=1))
    since = {"since": start.isoformat()}

    assert await listed(live, agent=AGENT, **since) == [s[1], s[2], s[5]]
    assert await listed(live, agent=OTHER_AGENT) == [s[3], s[4]]
    assert await listed(live, task="t-a") == [s[1], s[2], s[5]]
    assert await listed(live, owner="olga") == [s[1], s[2], s[3]]
    assert await listed(live, owner="pete", task="t-b") == [s[4]]
    assert await listed(live, tool="tool-a") == [s[1], s[3], s[4]]
    assert await listed(live, tool="tool-b") == [s[2]]
    assert await listed(live, decision="deny") == [s[2]]
    assert await listed(live, decision="approval_required") == [s[4]]
    assert await listed(live, txn="x-2") == [s[3], s[4]]
    assert await listed(live, exception="bg-9") == [s[2], s[4]]
    assert await listed(live, exception="bg-9", decision="deny", tool="tool-b", txn="x-1") == [s[2]]
    assert await listed(live, exception="bg-1") == []
    # Exact matches; an empty value is no filter; a NUL matches nothing.
    assert await listed(live, tool="tool-%") == []
    assert await listed(live, tool="tool-a\x00") == []
    assert len(await listed(live, tool="", limit=1000)) == len(await chain(live))
    # since inclusive, until exclusive, any zone, Z or an offset.
    at = [start + timedelta(seconds=i) for i in range(5)]
    assert await listed(live, since=at[1].isoformat()) == [s[2], s[3], s[4], s[5]]
    zulu = at[3].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert await listed(live, since=at[1].isoformat(), until=zulu) == [s[2], s[3]]
    ist = at[1].astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    assert await listed(live, since=ist, until=at[2].isoformat()) == [s[2]]
    assert await listed(live, until=start.isoformat()) == list(range(1, s[1]))
    # Paging: after and limit, oldest first; newest first ignores after.
    assert await listed(live, after=s[2], limit=2) == [s[3], s[4]]
    assert await listed(live, **since, order="desc") == [s[5], s[4], s[3], s[2], s[1]]
    assert await listed(live, **since, order="desc", limit=2, after=s[5]) == [s[5], s[4]]
    assert await listed(live, limit=1, order="asc") == [1]


async def test_a_listed_record_shows_every_field(live: Live) -> None:
    start = later(live)
    made = await live.services.storage.append_audits(marked_events(start))
    r = await live.http.get(
        "/v1/admin/audit", params={"exception": "bg-9", "limit": 1}, headers=live.admin
    )
    (record,) = r.json()["records"]
    assert record == {
        "seq": made[1],
        "time": (start + timedelta(seconds=1)).isoformat(),
        "event": "gateway.call",
        "decision": "deny",
        "code": "policy_denied",
        "agent": AGENT,
        "owner": "olga",
        "task": "t-a",
        "intent": None,
        "jti": None,
        "txn": "x-1",
        "tool": "tool-b",
        "action": "list",
        "tier": "read",
        "argument_digest": None,
        "policies": ["default/reads.cedar:3"],
        "policy_version": None,
        "latency_ms": 3.25,
        "upstream_status": None,
        "exception": "bg-9",
        "detail": "forbid: tool-b on weekends",
        "arguments": None,
    }


BAD_LIST_INPUT = [
    {"after": "x"},
    {"after": "-1"},
    {"after": "1.5"},
    {"limit": "x"},
    {"limit": "0"},
    {"limit": "1001"},
    {"limit": "-5"},
    {"since": "yesterday"},
    {"until": "2026-13-01T00:00:00Z"},
    {"since": "2026-01-01T00:00:00"},
    {"until": "2026-01-01"},
    {"order": "sideways"},
    {"order": ""},
]
BAD_EXPORT_INPUT = [{"format": "csv"}, {"format": ""}, {"format": "JSONL"}, {"after": "x"}]


async def test_bad_input_is_400(live: Live) -> None:
    for path, cases in (
        ("/v1/admin/audit", BAD_LIST_INPUT),
        ("/v1/admin/audit/export", BAD_EXPORT_INPUT),
    ):
        for params in cases:
            r = await live.http.get(path, params=params, headers=live.admin)
            assert r.status_code == 400, (path, params, r.text)
            assert r.json()["code"] == "invalid_request", (path, params)


async def test_a_negative_export_start_is_400(live: Live) -> None:
    r = await live.http.get("/v1/admin/audit/export", params={"after": "-1"}, headers=live.admin)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_request"


# --- export -------------------------------------------------------------------------------


async def test_the_jsonl_export_verifies_offline(live: Live) -> None:
    await traffic(live)
    await live.services.storage.append_audits(marked_events(later(live)))
    first = await take_checkpoint(live)
    await traffic(live)
    second = await take_checkpoint(live)
    assert second["seq"] > first["seq"]

    lines = await export(live)
    records, points = read_export(lines)
    assert records == await chain(live)
    assert points == [first["jws"], second["jws"]]
    # Records first, then the checkpoints.
    assert [json.loads(line)["type"] for line in lines] == ["record"] * len(records) + [
        "checkpoint"
    ] * 2
    assert json.loads(lines[-1]) == {k: second[k] for k in ("type", "seq", "hash", "jws")}
    # With nothing but the export and the published keys.
    keys = await published_keys(live)
    report = audit.verify(
        records,
        points,
        keys=keys,
        algorithms=[live.services.settings.keys.algorithm],
        issuer=live.services.settings.issuer,
    )
    assert report.ok, report.problem
    assert (report.records, report.checkpoints) == (len(records), 2)
    assert (report.first_seq, report.last_seq, report.head) == (1, second["seq"], second["hash"])
    # A key that did not sign them verifies nothing.
    stranger = KeyRing.from_private([key("EdDSA", 90)])
    report = audit.verify(records, points, keys=stranger, algorithms=["EdDSA"])
    assert report.problem is not None
    assert report.problem.kind == "bad_checkpoint_signature"
    # The body of each record is the listed record's content.
    listed_records = (
        await live.http.get("/v1/admin/audit", params={"limit": 1000}, headers=live.admin)
    ).json()["records"]
    for record, shown in zip(records, listed_records, strict=True):
        assert record.seq == shown["seq"]
        assert record.body["detail"] == shown["detail"]
        assert record.body["event"] == shown["event"]


async def test_an_export_from_a_point_verifies_from_that_point(live: Live) -> None:
    await traffic(live)
    point = await take_checkpoint(live)
    whole = await chain(live)
    start = 4
    records, points = read_export(await export(live, after=start))
    assert records == whole[start:]
    assert points == [point["jws"]]
    report = audit.verify(
        records, points, keys=await published_keys(live), start_prev=whole[start - 1].hash
    )
    assert report.ok, report.problem
    assert report.first_seq == start + 1


async def test_the_ocsf_export(live: Live) -> None:
    await traffic(live)
    made = await live.services.storage.append_audits(marked_events(later(live)))
    await take_checkpoint(live)
    lines = [json.loads(line) for line in await export(live, format="ocsf")]
    records = await chain(live)
    assert len(lines) == len(records)  # no checkpoints in OCSF
    assert {r.body["event"] for r in records} >= {"gateway.call", "token.exchange", "task.started"}
    for line, record in zip(lines, records, strict=True):
        api = record.body["event"] in ("gateway.call", "token.exchange")
        assert line["class_uid"] == (6003 if api else 3003)
        assert line["category_uid"] == (6 if api else 3)
        assert line["type_uid"] == line["class_uid"] * 100 + line["activity_id"]
        assert line["activity_name"] == record.body["event"]
        assert line["metadata"]["uid"] == str(record.seq)
        assert line["metadata"]["version"] == "1.3.0"
        assert line["unmapped"]["chain"] == {
            "seq": record.seq,
            "prev": record.prev,
            "hash": record.hash,
        }
        when = audit.event_of(record.body).time
        assert line["time"] == int(when.timestamp() * 1000)
        allowed = record.body["decision"] in ("allow", "info")
        assert line["status"] == ("Success" if allowed else "Failure")
        assert ("api" in line) == api
    by_seq = {int(line["metadata"]["uid"]): line for line in lines}
    call, refused = by_seq[made[0]], by_seq[made[1]]
    assert call["api"] == {
        "operation": "list",
        "service": {"name": "tool-a"},
        "response": {"code": 200},
    }
    assert call["duration"] == 3.25
    assert call["actor"]["user"] == {"uid": AGENT, "type": "Service"}
    assert call["actor"]["session"] == {"uid": "t-a"}
    assert call["metadata"]["correlation_uid"] == "x-1"
    assert (refused["status"], refused["status_code"], refused["severity_id"]) == (
        "Failure",
        "policy_denied",
        3,
    )
    assert refused["unmapped"]["exception_id"] == "bg-9"
    assert by_seq[made[2]]["class_uid"] == 6003  # token.exchange
    assert by_seq[made[3]]["class_uid"] == 3003  # approval.requested
    assert by_seq[made[4]]["class_uid"] == 3003  # task.ended


# --- checkpoints --------------------------------------------------------------------------


async def test_checkpoints_sign_the_head(live: Live) -> None:
    await traffic(live)
    head_seq, head_hash = await live.services.storage.audit_head()
    point = await take_checkpoint(live)
    assert (point["type"], point["seq"], point["hash"]) == ("checkpoint", head_seq, head_hash)
    assert datetime.fromisoformat(point["time"]) == live.clock.now()
    signed = audit.verify_checkpoint(
        point["jws"],
        keys=await published_keys(live),
        algorithms=["EdDSA", "ES256"],
        issuer=live.services.settings.issuer,
    )
    assert (signed.seq, signed.hash) == (head_seq, head_hash)
    # The head has not moved: the same checkpoint, not a second one.
    live.clock.advance(60)
    again = await take_checkpoint(live)
    assert again == point
    await traffic(live)
    newer = await take_checkpoint(live)
    assert newer["seq"] > point["seq"]
    r = await live.http.get("/v1/admin/audit/checkpoints", headers=live.admin)
    assert r.status_code == 200
    assert r.json() == {"checkpoints": [point, newer]}
    report = await verify(live)
    assert report == {
        "ok": True,
        "records": newer["seq"],
        "checkpoints": 2,
        "first_seq": 1,
        "last_seq": newer["seq"],
        "head": newer["hash"],
        "problem": None,
    }


# --- tampering with the database ----------------------------------------------------------


async def tampered(live: Live) -> tuple[list[ChainRecord], dict[str, Any]]:
    """A chain with some traffic and a checkpoint of its head; verified before."""
    await traffic(live)
    await live.services.storage.append_audits(marked_events(later(live)))
    point = await take_checkpoint(live)
    assert (await verify(live))["ok"]
    return await chain(live), point


EDITS: list[tuple[str, Any]] = [
    ("detail", "nothing to see here"),
    ("decision", "allow"),
    ("agent", "spiffe://taskbound.local/agents/mallory"),
    ("policies", ["forged.cedar:1"]),
    ("time", datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)),
    ("latency_ms", 0.001),
    ("exception_id", None),
    ("prev_hash", "0" * 64),
    ("hash", "f" * 64),
]


@pytest.mark.parametrize(("column", "value"), EDITS, ids=[c for c, _ in EDITS])
async def test_an_edited_row_is_reported_at_its_seq(live: Live, column: str, value: Any) -> None:
    records, _ = await tampered(live)
    victim = next(r for r in records if r.body["exception_id"] == "bg-9")
    with database(live) as db:
        db.execute(
            update(t.audit_events).where(t.audit_events.c.seq == victim.seq).values({column: value})
        )
    report = await verify(live)
    assert report["ok"] is False
    assert report["problem"] == {
        "kind": "edited",
        "seq": victim.seq,
        "detail": f"record {victim.seq}'s content does not match its hash",
    }
    assert report["records"] == victim.seq - 1
    assert report["head"] == records[victim.seq - 2].hash


async def test_a_deleted_row_is_missing_at_the_next_seq(live: Live) -> None:
    records, _ = await tampered(live)
    victim = records[len(records) // 2]
    with database(live) as db:
        db.execute(delete(t.audit_events).where(t.audit_events.c.seq == victim.seq))
    report = await verify(live)
    assert report["ok"] is False
    assert report["problem"] == {
        "kind": "missing",
        "seq": victim.seq + 1,
        "detail": f"records {victim.seq}..{victim.seq} are missing",
    }


async def test_deleted_first_rows_are_missing(live: Live) -> None:
    await tampered(live)
    with database(live) as db:
        db.execute(delete(t.audit_events).where(t.audit_events.c.seq <= 3))
    report = await verify(live)
    assert report["problem"] == {
        "kind": "missing",
        "seq": 4,
        "detail": "records 1..3 are missing",
    }


async def test_rows_cut_from_the_end_are_truncated(live: Live) -> None:
    records, _point = await tampered(live)
    cut = records[-3].seq
    with database(live) as db:
        db.execute(delete(t.audit_events).where(t.audit_events.c.seq >= cut))
    report = await verify(live)
    assert report["ok"] is False
    assert report["problem"]["kind"] == "truncated"
    assert report["problem"]["seq"] == cut
    assert report["last_seq"] == cut - 1


async def test_a_rewritten_tail_is_caught_by_the_checkpoint(live: Live) -> None:
    """Someone who knows the format edits a record and recomputes every hash after it:
    the links hold, the signed head does not."""
    records, point = await tampered(live)
    victim = next(r for r in records if r.body["decision"] == "deny")
    prev = records[victim.seq - 2].hash
    with database(live) as db:
        for record in records[victim.seq - 1 :]:
            body = dict(record.body)
            if record.seq == victim.seq:
                body["detail"] = "nothing to see here"
            digest = audit.record_hash(record.seq, prev, body)
            db.execute(
                update(t.audit_events)
                .where(t.audit_events.c.seq == record.seq)
                .values(detail=body["detail"], prev_hash=prev, hash=digest)
            )
            prev = digest
    report = await verify(live)
    assert report["ok"] is False
    assert report["problem"] == {
        "kind": "checkpoint_mismatch",
        "seq": point["seq"],
        "detail": f"record {point['seq']} is not the one the checkpoint signed",
    }
    # Every record itself is consistent: the chain was walked to its end.
    assert report["records"] == len(records)


async def test_verification_reads_the_store_a_page_at_a_time(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server never holds the whole chain: it walks it page by page (here 3 records
    a page) and still finds a problem at the right record."""
    records, point = await tampered(live)
    monkeypatch.setattr(audit_chain, "PAGE", 3)
    storage = live.services.storage
    asked: list[int] = []
    list_chain = storage.list_chain

    async def spy(*, after: int = 0, limit: int = 1000) -> list[ChainRecord]:
        asked.append(limit)
        return await list_chain(after=after, limit=limit)

    monkeypatch.setattr(storage, "list_chain", spy)
    assert (await verify(live))["ok"]
    assert max(asked) == 3
    assert len(asked) >= len(records) // 3
    victim = records[len(records) // 2]
    with database(live) as db:
        db.execute(delete(t.audit_events).where(t.audit_events.c.seq == victim.seq))
    report = await verify(live)
    assert report["problem"]["kind"] == "missing"
    assert report["problem"]["seq"] == victim.seq + 1
    assert point["seq"] >= victim.seq


async def test_a_checkpoint_row_signed_by_another_key_is_refused(live: Live) -> None:
    _records, point = await tampered(live)
    forged = audit.sign_checkpoint(
        seq=point["seq"],
        head=point["hash"],
        time=live.clock.now(),
        issuer=live.services.settings.issuer,
        key=key("EdDSA", 91),
    )
    with database(live) as db:
        db.execute(
            update(t.audit_checkpoints)
            .where(t.audit_checkpoints.c.seq == point["seq"])
            .values(jws=forged.jws, kid=forged.kid)
        )
    report = await verify(live)
    assert report["ok"] is False
    assert report["problem"] == {
        "kind": "bad_checkpoint_signature",
        "seq": None,
        "detail": "unknown kid",
    }


async def test_archiving_through_a_pinned_checkpoint_keeps_the_store_verifiable(
    live: Live,
) -> None:
    records, _point = await tampered(live)
    through = 6
    pin = await live.services.audit.checkpoint_at(through)
    assert (pin.seq, pin.hash) == (through, records[through - 1].hash)
    assert (await live.services.audit.checkpoint_at(through)).jws == pin.jws
    with pytest.raises(ValueError, match="no record"):
        await live.services.audit.checkpoint_at(len(records) + 5)
    archive = read_export(await export(live))
    assert await live.services.storage.delete_audit_through(through) == through
    report = await verify(live)
    assert report["ok"] is True, report
    assert (report["first_seq"], report["records"], report["checkpoints"]) == (
        through + 1,
        len(records) - through,
        2,
    )
    # The live export verifies from the pin; the archive and it make the whole chain.
    live_records, points = read_export(await export(live))
    keys = await published_keys(live)
    assert audit.verify(live_records, points, keys=keys, start_prev=pin.hash).ok
    assert audit.verify(archive[0][:through] + live_records, points, keys=keys).ok


async def test_a_copied_checkpoint_row_does_not_pin_a_cut(live: Live) -> None:
    """Records cut from the front, and a checkpoint row made for the cut from another
    checkpoint's signature: the pin is what a signature states, so the cut shows."""
    await traffic(live)
    early = await take_checkpoint(live)
    records, _ = await tampered(live)
    cut = early["seq"] + 2
    with database(live) as db:
        db.execute(delete(t.audit_events).where(t.audit_events.c.seq <= cut))
        db.execute(
            t.audit_checkpoints.insert().values(
                seq=cut,
                hash=records[cut].prev,
                time=live.clock.now(),
                kid=live.services.keys.signer(KeyPurpose.AUDIT).kid,
                jws=early["jws"],
            )
        )
    report = await verify(live)
    assert report["ok"] is False
    assert report["problem"] == {
        "kind": "missing",
        "seq": cut + 1,
        "detail": f"records 1..{cut} are missing",
    }


async def test_checkpoints_verify_after_the_audit_key_is_rotated(live: Live) -> None:
    """A rotated audit key outlives the credentials overlap: the checkpoints it signed
    still verify once the sweeper has pruned retired keys."""
    await traffic(live)
    old = await take_checkpoint(live)
    r = await live.http.post(
        "/v1/admin/keys/rotate", params={"purpose": "audit"}, headers=live.admin
    )
    assert r.status_code == 201, r.text
    live.clock.advance(7 * 24 * 3600)
    await live.services.storage.prune_keys(live.clock.now())
    await live.services.keys.reload()
    await traffic(live)
    new = await take_checkpoint(live)
    report = await verify(live)
    assert report["ok"] is True, report["problem"]
    assert report["checkpoints"] == 2
    kids = [
        audit.verify_checkpoint(p["jws"], keys=await published_keys(live), algorithms=["EdDSA"]).kid
        for p in (old, new)
    ]
    assert kids[0] != kids[1]


async def test_an_untouched_store_verifies_from_genesis(live: Live) -> None:
    await traffic(live)
    report = await verify(live)
    records = await chain(live)
    assert report["ok"] is True
    assert (report["records"], report["checkpoints"], report["first_seq"]) == (len(records), 0, 1)
    assert records[0].prev == GENESIS
