"""Shared Signals out: SETs pushed over real HTTP on loopback to a receiver that records them
and verifies each one against the broker's published SSF key set; delivery is ordered,
retried, resumable and shared safely between replicas. Plus the `signals` configuration."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from taskbound.config import Settings, load_settings
from taskbound.core.clock import FakeClock
from taskbound.core.keys import KeyRing
from taskbound.core.model import KeyPurpose, RevocationKind
from taskbound.core.signals import (
    CAEP_CREDENTIAL_CHANGE,
    CAEP_SESSION_REVOKED,
    SET_TYP,
    SecurityEvent,
    verify_set,
)
from taskbound.errors import ConfigError
from taskbound.service.signals import DeliveryFailed, SignalSender, signal_jti
from tests.api.conftest import AGENT, Live, free_port, make_settings, start_live
from tests.services import postgres_url
from tests.storage.conftest import postgres_schema

AUDIENCE = "https://receiver.example/ssf"
AUTHORIZATION = "Bearer receiver-secret-not-logged"
WAIT_S = 10.0


# --- a receiver on loopback ----------------------------------------------------------------


@dataclass
class Push:
    token: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """An RFC 8935 receiver: records every push and answers from a script (202 after)."""

    script: list[int] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    delay: float = 0.0

    async def endpoint(self, request: Request) -> Response:
        token = (await request.body()).decode()
        self.pushes.append(Push(token, {k.lower(): v for k, v in request.headers.items()}))
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.script.pop(0) if self.script else 202
        if status == 400:
            return JSONResponse({"err": "invalid_key", "description": "unknown key"}, 400)
        return Response(status_code=status)

    @property
    def tokens(self) -> list[str]:
        return [p.token for p in self.pushes]


@contextlib.asynccontextmanager
async def serve(recorder: Recorder) -> AsyncIterator[str]:
    port = free_port()
    app = Starlette(routes=[Route("/ssf", recorder.endpoint, methods=["POST"])])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "receiver failed to start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/ssf"
    finally:
        server.should_exit = True
        await task


def receiver(endpoint: str, name: str = "rec", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint": endpoint,
        "audience": AUDIENCE,
        "authorization": AUTHORIZATION,
        **extra,
    }


async def published_keys(live: Live) -> KeyRing:
    r = await live.http.get("/.well-known/ssf-jwks.json")
    assert r.status_code == 200
    return KeyRing.from_jwks(r.json())


async def verified(live: Live, token: str) -> SecurityEvent:
    """What a receiver does: verify the SET against the broker's published SSF keys."""
    return verify_set(
        token,
        keys=await published_keys(live),
        issuer=live.services.settings.issuer,
        audience=AUDIENCE,
        algorithms=["EdDSA", "ES256"],
        now=live.clock.now(),
        max_age=timedelta(minutes=5),
        leeway=timedelta(seconds=30),
    )


def session_of(event: SecurityEvent) -> str:
    assert event.subject is not None
    return str(event.subject["session"]["id"])


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait until ``check`` holds (a plain or an async predicate), at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.01)


def signal_settings(tmp_path: Path, receivers: list[dict[str, Any]], **signals: Any) -> Settings:
    return make_settings(
        tmp_path,
        storage={"url": signals.pop("storage_url", f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}")},
        signals={"receivers": receivers, "retry_max_seconds": 0.05, **signals},
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, clock: FakeClock, *, registry: bool = True
) -> AsyncIterator[Live]:
    gen = start_live(settings, clock, registry=registry)
    live = await gen.__anext__()
    try:
        yield live
    finally:
        await gen.aclose()


def broker(
    tmp_path: Path, clock: FakeClock, receivers: list[dict[str, Any]], **signals: Any
) -> contextlib.AbstractAsyncContextManager[Live]:
    return running(signal_settings(tmp_path, receivers, **signals), clock)


def sender_of(live: Live) -> SignalSender:
    sender = live.services.signal_sender
    assert sender is not None
    return sender


async def started_task(live: Live) -> tuple[dict[str, Any], Any]:
    agent = await live.agent()
    r = await agent.start()
    assert r.status_code == 201, r.text
    return r.json(), agent


async def end_task(live: Live) -> str:
    task, agent = await started_task(live)
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/complete")
    assert r.json()["state"] == "completed"
    return str(task["id"])


async def last_seq(live: Live) -> int:
    return await live.services.storage.last_revocation_seq()


async def cursor_of(live: Live, name: str) -> int | None:
    return await live.services.storage.get_signal_cursor(name)


async def has_cursor(live: Live, name: str) -> bool:
    return await cursor_of(live, name) is not None


async def cursor_is(live: Live, name: str, seq: int) -> bool:
    return await cursor_of(live, name) == seq


# --- what is sent --------------------------------------------------------------------------


async def test_ending_a_task_pushes_a_signed_session_revoked(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder()
    async with serve(recorder) as url, broker(tmp_path, clock, [receiver(url)]) as live:
        sender = sender_of(live)
        rec = sender.receivers[0]
        assert await sender.cursor(rec) == 0
        task_id = await end_task(live)
        assert await sender.deliver_pending(rec) == 1
        [push] = recorder.pushes
        assert push.headers["content-type"] == "application/secevent+jwt"
        assert push.headers["accept"] == "application/json"
        assert push.headers["authorization"] == AUTHORIZATION
        event = await verified(live, push.token)
        seq = await last_seq(live)
        assert event.jti == signal_jti(live.services.settings.issuer, "rec", seq)
        assert list(event.events) == [CAEP_SESSION_REVOKED]
        assert event.subject == {
            "format": "complex",
            "session": {"format": "opaque", "id": task_id},
            "user": {"format": "uri", "uri": AGENT},
        }
        assert event.events[CAEP_SESSION_REVOKED]["initiating_entity"] == "system"
        # Delivered: the cursor in the database moved past it, and nothing is left.
        assert await live.services.storage.get_signal_cursor("rec") == seq
        assert await sender.deliver_pending(rec) == 0
        assert len(recorder.pushes) == 1
        assert sender.delivered == 1


async def test_revoking_a_credential_pushes_credential_change(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder()
    async with serve(recorder) as url, broker(tmp_path, clock, [receiver(url)]) as live:
        sender = sender_of(live)
        rec = sender.receivers[0]
        await sender.cursor(rec)
        task, _ = await started_task(live)
        jti = task["credentials"][0]["jti"]
        r = await live.http.post(
            f"/v1/admin/credentials/{jti}/revoke", json={"reason": "leaked"}, headers=live.admin
        )
        assert r.json()["changed"] is True
        await sender.deliver_pending(rec)
        [push] = recorder.pushes
        event = await verified(live, push.token)
        payload = event.events[CAEP_CREDENTIAL_CHANGE]
        assert payload["change_type"] == "revoke"
        assert payload["initiating_entity"] == "admin"
        assert payload["reason_admin"] == {"en": "leaked"}
        assert event.subject is not None
        assert event.subject["credential"] == {
            "format": "jwt_id",
            "iss": live.services.settings.issuer,
            "jti": jti,
        }
        # The header is the SET profile's; the key, the one published for SSF only.
        header = json.loads(base64.urlsafe_b64decode(push.token.split(".")[0] + "=="))
        signer = live.services.keys.signer(KeyPurpose.SIGNALS)
        assert header == {"alg": "EdDSA", "typ": SET_TYP, "kid": signer.kid}
        r = await live.http.get("/.well-known/ssf-jwks.json")
        assert [k["kid"] for k in r.json()["keys"]] == [signer.kid]
        r = await live.http.get("/.well-known/jwks.json")
        assert signer.kid not in {k["kid"] for k in r.json()["keys"]}


async def test_the_loop_wakes_on_the_revocation_feed(tmp_path: Path, clock: FakeClock) -> None:
    recorder = Recorder()
    # A poll interval far longer than the test: only the feed's wake-up can deliver in time.
    async with (
        serve(recorder) as url,
        broker(tmp_path, clock, [receiver(url)], poll_interval_seconds=600) as live,
    ):
        sender = sender_of(live)
        sender.start()
        await eventually(lambda: has_cursor(live, "rec"), "cursor created")
        await end_task(live)
        await live.services.revocations.sync()  # what the feed does on a notification
        await eventually(lambda: len(recorder.pushes) == 1, "woken by the feed")
        await sender.aclose()


async def test_history_is_not_replayed_unless_from_start(tmp_path: Path, clock: FakeClock) -> None:
    old, new = Recorder(), Recorder()
    async with serve(old) as url_old, serve(new) as url_new:
        receivers = [receiver(url_old, "fresh"), receiver(url_new, "full", from_start=True)]
        async with broker(tmp_path, clock, receivers) as live:
            await end_task(live)  # before either receiver's first start
            sender = sender_of(live)
            fresh, full = sender.receivers
            assert await sender.deliver_pending(fresh) == 0
            assert old.pushes == []
            assert await sender.deliver_pending(full) == 1
            assert CAEP_SESSION_REVOKED in (await verified(live, new.tokens[0])).events
            assert await live.services.storage.get_signal_cursor("fresh") == await last_seq(live)


# --- failures --------------------------------------------------------------------------------


async def test_a_failing_receiver_is_retried_in_order_until_it_accepts(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder(script=[503, 503, 500, 202, 202])
    async with serve(recorder) as url, broker(tmp_path, clock, [receiver(url)]) as live:
        sender = sender_of(live)
        rec = sender.receivers[0]
        await sender.cursor(rec)
        first = await end_task(live)
        second = await end_task(live)
        sender.start()
        await eventually(lambda: sender.delivered == 2, "delivered after the retries")
        # The cursor is written just after the delivery is counted: let it land first.
        for _ in range(200):
            if await live.services.storage.get_signal_cursor("rec") == await last_seq(live):
                break
            await asyncio.sleep(0.01)
        await sender.aclose()
        events = [await verified(live, t) for t in recorder.tokens]
        sessions = [session_of(e) for e in events]
        # The first SET, three times refused, then accepted; only then the second.
        assert sessions == [first, first, first, first, second]
        assert len({e.jti for e in events[:4]}) == 1  # one jti across the retries
        assert events[4].jti != events[0].jti
        assert sender.failures == 3
        assert await live.services.storage.get_signal_cursor("rec") == await last_seq(live)


async def test_an_unreachable_receiver_keeps_the_cursor(tmp_path: Path, clock: FakeClock) -> None:
    dead = f"http://127.0.0.1:{free_port()}/ssf"  # nothing listens there
    async with broker(tmp_path, clock, [receiver(dead)]) as live:
        sender = sender_of(live)
        rec = sender.receivers[0]
        start = await sender.cursor(rec)
        await end_task(live)
        with pytest.raises(DeliveryFailed) as info:
            await sender.deliver_pending(rec)
        assert info.value.reason == "ConnectError"
        assert await live.services.storage.get_signal_cursor("rec") == start


async def test_a_refused_set_is_logged_and_skipped(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskbound")
    recorder = Recorder(script=[400])
    async with serve(recorder) as url, broker(tmp_path, clock, [receiver(url)]) as live:
        sender = sender_of(live)
        rec = sender.receivers[0]
        await sender.cursor(rec)
        first = await end_task(live)
        second = await end_task(live)
        assert await sender.deliver_pending(rec) == 2
        sessions = [session_of(await verified(live, t)) for t in recorder.tokens]
        assert sessions == [first, second]  # each once: the refused one is not retried
        assert (sender.rejected, sender.delivered) == (1, 1)
        refused = [r for r in caplog.records if getattr(r, "event", None) == "signal.refused"]
        assert len(refused) == 1
        assert refused[0].levelno == logging.WARNING
        assert refused[0].__dict__["err"] == "invalid_key"
        assert refused[0].__dict__["receiver"] == "rec"
        assert AUTHORIZATION not in caplog.text
        assert recorder.tokens[0] not in caplog.text


# --- restarts and replicas -------------------------------------------------------------------


async def test_a_restarted_sender_resumes_after_its_cursor(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder()
    async with serve(recorder) as url:
        settings = signal_settings(tmp_path, [receiver(url)])
        async with running(settings, clock) as live:
            sender = sender_of(live)
            await sender.cursor(sender.receivers[0])
            first = await end_task(live)
            await sender.deliver_pending(sender.receivers[0])
            # Revoked while no sender runs: must be delivered after the restart.
            second = await end_task(live)
        # A new process on the same database.
        async with running(settings, clock, registry=False) as live:
            sender = sender_of(live)
            third = await end_task(live)
            assert await sender.deliver_pending(sender.receivers[0]) == 2
            sessions = [session_of(await verified(live, t)) for t in recorder.tokens]
            assert sessions == [first, second, third]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_two_senders_on_one_database_skip_nothing(
    tmp_path: Path, clock: FakeClock, backend: str
) -> None:
    recorder = Recorder(delay=0.005)
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(postgres_schema(postgres_url()))
            if backend == "postgres"
            else f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"
        )
        async with (
            serve(recorder) as endpoint,
            broker(tmp_path, clock, [receiver(endpoint)], storage_url=url) as live,
        ):
            one = sender_of(live)
            # A second replica: its own sender on the same database and keys.
            two = SignalSender(
                live.services.settings,
                live.services.storage,
                live.services.keys,
                clock,
                live.services.http,
            )
            await one.cursor(one.receivers[0])
            ended = [await end_task(live) for _ in range(6)]
            target = await last_seq(live)
            one.start()
            two.start()
            try:
                await eventually(lambda: cursor_is(live, "rec", target), "all delivered")
            finally:
                await one.aclose()
                await two.aclose()
            events = [await verified(live, t) for t in recorder.tokens]
            # At least once each: every entry arrived, duplicates share their jti.
            assert {session_of(e) for e in events} == set(ended)
            by_jti: dict[str, set[str]] = {}
            for e in events:
                by_jti.setdefault(e.jti, set()).add(session_of(e))
            assert len(by_jti) == len(ended)
            assert all(len(ids) == 1 for ids in by_jti.values())


async def test_no_receivers_no_sender_and_no_signal_key(tmp_path: Path, clock: FakeClock) -> None:
    settings = make_settings(tmp_path, storage={"url": "memory://"})
    gen = start_live(settings, clock, registry=False)
    live = await gen.__anext__()
    try:
        assert live.services.signal_sender is None
        assert live.services.signal_receiver is None
        r = await live.http.get("/.well-known/ssf-jwks.json")
        assert r.json() == {"keys": []}
        r = await live.http.get("/.well-known/ssf-configuration")
        assert r.status_code == 404
    finally:
        await gen.aclose()


async def test_kinds_without_a_signal_only_move_the_cursor(
    tmp_path: Path, clock: FakeClock
) -> None:
    recorder = Recorder()
    async with serve(recorder) as url, broker(tmp_path, clock, [receiver(url)]) as live:
        sender = sender_of(live)
        rec = sender.receivers[0]
        await sender.cursor(rec)
        await started_task(live)
        r = await live.http.post(f"/v1/admin/agents/{AGENT}/suspend", headers=live.admin)
        assert r.json()["changed"] is True
        entries = await live.services.storage.list_revocations()
        kinds = [e.kind for e in entries]
        assert RevocationKind.AGENT in kinds
        sent = await sender.deliver_pending(rec)
        # The agent entry sends nothing; its task's revocation sends session-revoked.
        assert sent == kinds.count(RevocationKind.TASK) + kinds.count(RevocationKind.CREDENTIAL)
        assert len(recorder.pushes) == sent
        assert await live.services.storage.get_signal_cursor("rec") == await last_seq(live)


# --- configuration ---------------------------------------------------------------------------


def signals_config(**signals: Any) -> Any:
    return load_settings(environ={}, overrides={"signals": signals})


TRANSMITTER = {"name": "idp", "issuer": "https://idp.example", "jwks_url": "https://idp/jwks"}


@pytest.mark.parametrize(
    ("signals", "needle"),
    [
        ({"receivers": [receiver("http://receiver.example/ssf")]}, "must use https"),
        ({"receivers": [receiver("ftp://127.0.0.1/ssf")]}, "absolute http(s) URL"),
        ({"receivers": [receiver("https://u:p@receiver.example/ssf")]}, "credentials"),
        ({"receivers": [receiver("https://r.example/ssf#x")]}, "fragment"),
        ({"receivers": [receiver("https://r.example/ssf", "Bad Name")]}, "name"),
        (
            {"receivers": [receiver("https://a.example/"), receiver("https://b.example/")]},
            "used twice",
        ),
        ({"receivers": [{**receiver("https://r.example/"), "extra": 1}]}, "unknown key"),
        ({"transmitters": [{"name": "idp", "issuer": "https://idp"}]}, "exactly one of jwks"),
        ({"transmitters": [{**TRANSMITTER, "jwks_url": "http://idp.example/jwks"}]}, "https"),
        ({"transmitters": [{**TRANSMITTER, "algorithms": ["HS256"]}]}, "not asymmetric"),
        ({"transmitters": [{**TRANSMITTER, "algorithms": ["none"]}]}, "not asymmetric"),
        ({"transmitters": [{**TRANSMITTER, "action": "delete"}]}, "action"),
        ({"transmitters": [TRANSMITTER, TRANSMITTER]}, "used twice"),
        ({"max_age_seconds": 1}, "max_age_seconds"),
    ],
)
def test_bad_signals_configuration_is_refused(signals: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        signals_config(**signals)
    assert needle in info.value.detail


def test_signals_configuration_defaults_and_redaction() -> None:
    settings = signals_config(
        receivers=[receiver("http://localhost:9/ssf"), receiver("http://[::1]:9/x", "v6")],
        transmitters=[{**TRANSMITTER, "authorization": "Bearer inbound-secret"}],
    )
    t = settings.signals.transmitters[0]
    assert t.algorithms == ("ES256", "EdDSA")
    assert (t.action, t.compromise_action, t.audience) == ("suspend", "quarantine", None)
    assert len(t.accepted_events) == 5
    assert settings.signals.receivers[0].from_start is False
    shown = str(settings.redacted())
    assert "receiver-secret-not-logged" not in shown
    assert "inbound-secret" not in shown
    assert "**********" in shown
