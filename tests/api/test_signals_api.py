"""Shared Signals over the broker's HTTP API: SETs pushed in by a configured transmitter
(RFC 8935) suspend or quarantine our agents, and anything forged, misdirected, replayed or
malformed is refused with its RFC 8935 error code and changes nothing; the SSF metadata and
key set are published; `serve`'s lifespan runs the sender."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from taskbound.api.app import create_app
from taskbound.core import jws
from taskbound.core.clock import FakeClock, to_epoch
from taskbound.core.keys import KeyRing, PrivateKey, generate_key, public_jwk
from taskbound.core.model import AgentState, KeyPurpose, RevocationKind, TaskState
from taskbound.core.signals import (
    CAEP_SESSION_REVOKED,
    RISC_ACCOUNT_DISABLED,
    RISC_CREDENTIAL_COMPROMISE,
    SET_TYP,
    verify_set,
)
from taskbound.errors import StorageError
from taskbound.service.admin import create_admin_token
from taskbound.service.runtime import open_services

from .conftest import AGENT, REGISTRY, Live, free_port, make_settings, start_live

IDP = "https://idp.example"
# In the transmitter's key set, but of an algorithm "idp" is not pinned to.
OFF_PIN = generate_key("EdDSA")
GUARD = "Bearer inbound-secret-never-logged"
WAIT_S = 10.0


def b64json(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture
def idp_key() -> PrivateKey:
    return generate_key("ES256")


def write_jwks(path: Path, *keys: PrivateKey) -> None:
    path.write_text(json.dumps({"keys": [public_jwk(k) for k in keys]}))


def remove(path: Path) -> None:
    path.unlink()


@pytest.fixture
def jwks_file(tmp_path: Path, idp_key: PrivateKey) -> Path:
    path = tmp_path / "idp-jwks.json"
    write_jwks(path, idp_key, OFF_PIN)
    return path


@pytest.fixture
async def live(tmp_path: Path, clock: FakeClock, jwks_file: Path) -> AsyncIterator[Live]:
    transmitters = [
        {"name": "idp", "issuer": IDP, "jwks_file": str(jwks_file), "algorithms": ["ES256"]},
        {
            "name": "guarded",
            "issuer": IDP,
            "jwks_file": str(jwks_file),
            "authorization": GUARD,
            "action": "quarantine",
        },
    ]
    settings = make_settings(
        tmp_path,
        storage={"url": f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"},
        signals={"transmitters": transmitters},
    )
    async for live in start_live(settings, clock):
        yield live


class Idp:
    """The transmitter: mints SETs as a real IdP would, and lets a test bend any part."""

    def __init__(self, live: Live, key: PrivateKey) -> None:
        self.live = live
        self.key = key

    def claims(self, **overrides: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": IDP,
            "aud": self.live.services.settings.issuer,
            "iat": to_epoch(self.live.clock.now()),
            "jti": secrets.token_hex(12),
            "sub_id": {"format": "complex", "user": {"format": "uri", "uri": AGENT}},
            "events": {RISC_ACCOUNT_DISABLED: {"reason_admin": {"en": "disabled at the IdP"}}},
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self, key: PrivateKey | None = None, header: dict[str, Any] | None = None, **c: Any
    ) -> str:
        key = key or self.key
        head = {"alg": key.alg, "typ": SET_TYP, "kid": key.kid, **(header or {})}
        return jws.sign_compact(head, self.claims(**c), key)

    async def push(
        self,
        token: str | bytes,
        *,
        transmitter: str = "idp",
        content_type: str = "application/secevent+jwt",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.live.http.post(
            f"/v1/signals/{transmitter}",
            content=token,
            headers={"Content-Type": content_type, "Accept": "application/json", **(headers or {})},
        )


@pytest.fixture
def idp(live: Live, idp_key: PrivateKey) -> Idp:
    return Idp(live, idp_key)


async def live_task(live: Live) -> str:
    r = await (await live.agent()).start()
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def task_state(live: Live, task_id: str) -> TaskState:
    task = await live.services.storage.get_task(task_id)
    assert task is not None
    return task.state


async def agent_state(live: Live) -> AgentState:
    agent = await live.services.storage.get_agent(AGENT)
    assert agent is not None
    return agent.state


async def signal_entries(live: Live) -> list[Any]:
    return [
        e for e in await live.services.storage.list_revocations() if e.cause.startswith("signal:")
    ]


def accepted(r: httpx.Response) -> None:
    assert r.status_code == 202, r.text
    assert r.content == b""


def refused(r: httpx.Response, err: str) -> None:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["err"] == err
    assert set(body) == {"err", "description"}


# --- accepted signals ------------------------------------------------------------------------


async def test_account_disabled_suspends_the_agent_and_revokes_its_tasks(
    live: Live, idp: Idp
) -> None:
    task_id = await live_task(live)
    accepted(await idp.push(idp.mint()))
    assert await agent_state(live) is AgentState.SUSPENDED
    assert await task_state(live, task_id) is TaskState.REVOKED
    entries = await signal_entries(live)
    assert {(e.kind, e.subject) for e in entries} == {
        (RevocationKind.AGENT, AGENT),
        (RevocationKind.TASK, task_id),
    }
    assert {e.cause for e in entries} == {"signal:idp"}
    agent_entry = next(e for e in entries if e.kind is RevocationKind.AGENT)
    assert agent_entry.state == "suspended"
    assert agent_entry.reason == "disabled at the IdP"
    # The suspended agent cannot start another task.
    r = await (await live.agent()).start()
    assert r.status_code == 403


async def test_credential_compromise_quarantines_and_nothing_weakens_it(
    live: Live, idp: Idp
) -> None:
    # A pre-SSF transmitter: the subject inside the event, no top-level sub_id.
    compromise = {
        RISC_CREDENTIAL_COMPROMISE: {
            "subject": {"format": "uri", "uri": AGENT},
            "credential_type": "password",
        }
    }
    accepted(await idp.push(idp.mint(sub_id=None, events=compromise)))
    assert await agent_state(live) is AgentState.QUARANTINED
    # A later account-disabled (suspend) leaves a quarantined agent quarantined.
    accepted(await idp.push(idp.mint()))
    assert await agent_state(live) is AgentState.QUARANTINED
    [entry] = await signal_entries(live)
    assert entry.state == "quarantined"
    assert entry.reason == "credential-compromise"


async def test_events_for_others_are_accepted_and_ignored(live: Live, idp: Idp) -> None:
    stranger = {"format": "complex", "user": {"format": "uri", "uri": "spiffe://x.org/nobody"}}
    email = {"format": "email", "email": "someone@example.com"}
    not_ours = {"https://schemas.openid.net/secevent/caep/event-type/token-claims-change": {}}
    accepted(await idp.push(idp.mint(sub_id=stranger)))
    accepted(await idp.push(idp.mint(sub_id=email)))
    accepted(await idp.push(idp.mint(events=not_ours)))
    assert await agent_state(live) is AgentState.ACTIVE
    assert await signal_entries(live) == []


async def test_a_transmitter_with_its_own_action_and_authorization(live: Live, idp: Idp) -> None:
    token = idp.mint()
    refused(await idp.push(token, transmitter="guarded"), "authentication_failed")
    bad = {"Authorization": "Bearer nope"}
    refused(await idp.push(idp.mint(), transmitter="guarded", headers=bad), "authentication_failed")
    assert await agent_state(live) is AgentState.ACTIVE
    accepted(await idp.push(token, transmitter="guarded", headers={"Authorization": GUARD}))
    assert await agent_state(live) is AgentState.QUARANTINED
    assert {e.cause for e in await signal_entries(live)} == {"signal:guarded"}


async def test_a_rotated_transmitter_key_is_fetched_at_most_once_per_interval(
    live: Live, idp: Idp, jwks_file: Path, clock: FakeClock
) -> None:
    accepted(await idp.push(idp.mint(events={CAEP_SESSION_REVOKED: {}})))  # keys now loaded
    r = await live.http.post(f"/v1/admin/agents/{AGENT}/resume", headers=live.admin)
    assert r.json()["state"] == "active"
    rotated = generate_key("ES256")
    write_jwks(jwks_file, rotated)
    # Within jwks_min_refresh_seconds of the last load: not re-read, so refused.
    refused(await idp.push(idp.mint(key=rotated)), "invalid_key")
    clock.advance(31)
    accepted(await idp.push(idp.mint(key=rotated)))
    assert await agent_state(live) is AgentState.SUSPENDED
    # The old key is gone from the set now.
    refused(await idp.push(idp.mint()), "invalid_key")


# --- refused signals ------------------------------------------------------------------------


def none_alg(idp: Idp, *, signature: bool) -> str:
    """``alg: none``, with an empty signature (RFC 7519 §6.1 unsecured JWT) or with one
    copied from a genuine SET, as an attacker would try both."""
    tail = idp.mint().rsplit(".", 1)[1] if signature else ""
    return f"{b64json({'alg': 'none', 'typ': SET_TYP})}.{b64json(idp.claims())}.{tail}"


BAD: dict[str, tuple[Callable[[Idp], str], str]] = {
    "forged signature": (
        lambda idp: idp.mint(key=generate_key("ES256"), header={"kid": idp.key.kid}),
        "invalid_key",
    ),
    "unknown key": (lambda idp: idp.mint(key=generate_key("ES256")), "invalid_key"),
    "unsecured (alg none, no signature)": (
        lambda idp: none_alg(idp, signature=False),
        "invalid_request",
    ),
    "alg none with a signature": (lambda idp: none_alg(idp, signature=True), "invalid_key"),
    "algorithm not pinned": (lambda idp: idp.mint(key=OFF_PIN), "invalid_key"),
    "wrong issuer": (lambda idp: idp.mint(iss="https://evil.example"), "invalid_issuer"),
    "wrong audience": (lambda idp: idp.mint(aud="https://elsewhere.example"), "invalid_audience"),
    "too old": (
        lambda idp: idp.mint(iat=to_epoch(idp.live.clock.now()) - 3600 - 60),
        "invalid_request",
    ),
    "exp present": (
        lambda idp: idp.mint(exp=to_epoch(idp.live.clock.now()) + 60),
        "invalid_request",
    ),
    "sub present": (lambda idp: idp.mint(sub=AGENT), "invalid_request"),
    "wrong typ": (lambda idp: idp.mint(header={"typ": "JWT"}), "invalid_request"),
    "no events": (lambda idp: idp.mint(events={}), "invalid_request"),
    "not a JWS": (lambda idp: "not-a-token", "invalid_request"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_set_is_refused_and_changes_nothing(
    live: Live, idp: Idp, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskbound")
    task_id = await live_task(live)
    make, err = BAD[case]
    token = make(idp)
    refused(await idp.push(token), err)
    await untouched(live, task_id)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "signal.in_refused"]
    assert record.levelno == logging.WARNING
    assert (record.__dict__["transmitter"], record.__dict__["err"]) == ("idp", err)
    assert token not in caplog.text


async def untouched(live: Live, task_id: str) -> None:
    assert await agent_state(live) is AgentState.ACTIVE
    assert await task_state(live, task_id) is TaskState.ACTIVE
    assert await signal_entries(live) == []


async def test_a_replayed_set_is_refused_even_after_the_agent_was_resumed(
    live: Live, idp: Idp
) -> None:
    token = idp.mint()
    accepted(await idp.push(token))
    r = await live.http.post(f"/v1/admin/agents/{AGENT}/resume", headers=live.admin)
    assert r.json()["state"] == "active"
    task_id = await live_task(live)
    before = len(await signal_entries(live))
    refused(await idp.push(token), "invalid_request")
    assert await agent_state(live) is AgentState.ACTIVE
    assert await task_state(live, task_id) is TaskState.ACTIVE
    assert len(await signal_entries(live)) == before


async def test_a_set_whose_effect_failed_can_be_sent_again(
    live: Live, idp: Idp, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = live.services.registry
    real = registry.set_agent_state
    calls = 0

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StorageError(internal="database went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(registry, "set_agent_state", failing_once)
    token = idp.mint()
    r = await idp.push(token)
    assert r.status_code == 503  # not applied: the transmitter retries...
    assert await agent_state(live) is AgentState.ACTIVE
    accepted(await idp.push(token))  # ...and the same SET is then taken, once
    assert await agent_state(live) is AgentState.SUSPENDED
    refused(await idp.push(token), "invalid_request")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", None),
        ("application/jwt", None),
        ("text/plain", None),
        ("application/secevent+jwt", "x" * (16 * 1024 + 1)),
        ("application/secevent+jwt", "é".encode()),
    ],
)
async def test_the_request_must_be_one_small_set(
    live: Live, idp: Idp, content_type: str, body: str | bytes | None
) -> None:
    task_id = await live_task(live)
    refused(await idp.push(body or idp.mint(), content_type=content_type), "invalid_request")
    await untouched(live, task_id)


async def test_media_type_parameters_and_case_are_accepted(live: Live, idp: Idp) -> None:
    accepted(await idp.push(idp.mint(), content_type="Application/SecEvent+JWT; charset=ascii"))


async def test_unknown_transmitter_is_404_and_get_is_405(live: Live, idp: Idp) -> None:
    task_id = await live_task(live)
    r = await idp.push(idp.mint(), transmitter="stranger")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    r = await live.http.get("/v1/signals/idp")
    assert r.status_code == 405
    await untouched(live, task_id)


async def test_unreadable_transmitter_keys_are_a_503_to_retry(
    live: Live, idp: Idp, jwks_file: Path
) -> None:
    remove(jwks_file)
    r = await idp.push(idp.mint())
    assert r.status_code == 503
    assert await agent_state(live) is AgentState.ACTIVE


async def test_without_transmitters_every_push_is_404(tmp_path: Path, clock: FakeClock) -> None:
    settings = make_settings(tmp_path, storage={"url": "memory://"})
    async for live in start_live(settings, clock, registry=False):
        r = await live.http.post(
            "/v1/signals/idp", content="x", headers={"Content-Type": "application/secevent+jwt"}
        )
        assert r.status_code == 404


# --- out: metadata, keys and the sender in `serve` ------------------------------------------


async def test_serve_publishes_ssf_metadata_and_pushes_from_its_lifespan(
    tmp_path: Path, clock: FakeClock
) -> None:
    pushes: list[str] = []

    async def endpoint(request: Request) -> Response:
        pushes.append((await request.body()).decode())
        return Response(status_code=202)

    receiver_port = free_port()
    receiver = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/events", endpoint, methods=["POST"])]),
            host="127.0.0.1",
            port=receiver_port,
            log_config=None,
            lifespan="off",
        )
    )
    settings = make_settings(
        tmp_path,
        storage={"url": f"sqlite+aiosqlite:///{tmp_path / 'tb.db'}"},
        # Only the revocation feed's wake-up can deliver within the test.
        signals={
            "receivers": [
                {
                    "name": "siem",
                    "endpoint": f"http://127.0.0.1:{receiver_port}/events",
                    "audience": "urn:siem",
                }
            ],
            "poll_interval_seconds": 600,
        },
    )
    services = await open_services(settings, clock=clock)
    app = create_app(settings, services=services, sweep=False)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=settings.server.port, log_config=None, lifespan="on"
        )
    )
    async with contextlib.AsyncExitStack() as stack:
        for srv in (receiver, server):
            task = asyncio.create_task(srv.serve())
            stack.push_async_callback(stop, srv, task)
            while not srv.started:
                assert not task.done(), "server failed to start"
                await asyncio.sleep(0.01)
        stack.push_async_callback(services.aclose)
        base = f"http://127.0.0.1:{settings.server.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            r = await http.get("/.well-known/ssf-configuration")
            assert r.status_code == 200
            assert r.json() == {
                "spec_version": "1_0",
                "issuer": settings.issuer,
                "jwks_uri": f"{settings.public_url}/.well-known/ssf-jwks.json",
                "delivery_methods_supported": ["urn:ietf:rfc:8935"],
            }
            ssf = (await http.get("/.well-known/ssf-jwks.json")).json()
            signer = services.keys.signer(KeyPurpose.SIGNALS)
            assert [k["kid"] for k in ssf["keys"]] == [signer.kid]
            credentials = (await http.get("/.well-known/jwks.json")).json()
            assert signer.kid not in {k["kid"] for k in credentials["keys"]}
            # The lifespan started the sender: its cursor exists before anything happens.
            await eventually(lambda: services.storage.get_signal_cursor("siem"), "started")
            token = (await create_admin_token(services.storage, clock, "tests")).token
            live = Live(settings.public_url, services, clock, http, token)
            r = await http.post("/v1/admin/apply", json=REGISTRY, headers=live.admin)
            assert r.status_code == 200, r.text
            agent = await live.agent()
            task = (await agent.start()).json()
            r = await agent.call("POST", f"/v1/tasks/{task['id']}/complete")
            assert r.json()["state"] == "completed"
            # The revocation feed (started by the lifespan too) wakes the sender.
            await eventually(lambda: first(pushes), "pushed")
            event = verify_set(
                pushes[0],
                keys=KeyRing.from_jwks(ssf),
                issuer=settings.issuer,
                audience="urn:siem",
                algorithms=["EdDSA"],
                now=clock.now(),
                max_age=timedelta(minutes=1),
                leeway=timedelta(0),
            )
            assert event.subject is not None
            assert event.subject["session"]["id"] == task["id"]
    # Shut down: the sender's loop is gone with the lifespan.
    assert services.signal_sender is not None
    assert services.signal_sender.delivered == 1


async def stop(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await task


async def first(items: list[str]) -> str | None:
    return items[0] if items else None


async def eventually(check: Callable[[], Awaitable[object]], what: str) -> None:
    """Wait until ``check`` answers something other than None, at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while (await check()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.01)
