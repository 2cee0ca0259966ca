"""Where the agent's workload identity comes from: a token file read on every use, the
environment, the development issuer, and the SPIFFE Workload API over gRPC on a unix
socket — each against the live server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from spiffe._proto import workload_pb2, workload_pb2_grpc

from taskbound.sdk import (
    Client,
    DevIssuer,
    IdentityUnavailable,
    SpiffeWorkloadApi,
    StaticToken,
    TokenFile,
    Unauthorized,
    identity_from_env,
)
from taskbound.sdk.identity import MAX_TOKEN_BYTES
from tests.api.conftest import AGENT, free_port
from tests.gateway.conftest import World
from tests.sdk.conftest import HELPER, INTENT, LIST

READ = [("issues", "read")]


async def start_and_call(client: Client) -> str:
    """Start a task, call the HTTP tool, end it; the task's agent as the broker saw it."""
    async with client.task("triage", on_behalf_of="alice", scopes=READ, constraints=INTENT) as t:
        async with t.http("issues") as issues:
            assert (await issues.get(LIST)).status_code == 200
        return str((await t.state())["agent"])


# --- a token file ------------------------------------------------------------------------


async def test_a_token_file_is_read_again_for_every_use(world: World, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(await world.live.identity(AGENT) + "\n")
    async with Client(world.live.base, identity=TokenFile(path)) as client:
        assert await start_and_call(client) == AGENT
        # The platform rotates the file (here to another workload's token, to tell them apart).
        path.write_text(await world.live.identity(HELPER))
        assert await start_and_call(client) == HELPER


async def test_an_unusable_token_file_is_identity_unavailable(world: World, tmp_path: Path) -> None:
    path = tmp_path / "token"
    cases: list[tuple[Any, str]] = [
        (None, "cannot read the token file"),  # missing
        ("", "is empty"),
        (" \n\t", "is empty"),
        ("x" * (MAX_TOKEN_BYTES + 1), "too large"),
    ]
    for content, message in cases:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(content)
        async with Client(world.live.base, identity=TokenFile(path)) as client:
            with pytest.raises(IdentityUnavailable, match=message) as raised:
                await client.start_task("t", on_behalf_of="alice", scopes=READ)
        assert str(path) in str(raised.value)
        assert raised.value.code == "identity_unavailable"
    with pytest.raises(IdentityUnavailable, match="cannot read"):
        await TokenFile(tmp_path).token()  # a directory
    # A file holding something that is not an identity token reaches the broker, which says no.
    path.write_text("not-a-jwt")
    async with Client(world.live.base, identity=TokenFile(path)) as client:
        with pytest.raises(Unauthorized) as refused:
            await client.start_task("t", on_behalf_of="alice", scopes=READ)
    assert refused.value.status == 401


# --- the environment ---------------------------------------------------------------------


def test_identity_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    monkeypatch.delenv("TASKBOUND_IDENTITY_TOKEN_FILE", raising=False)
    with pytest.raises(IdentityUnavailable) as raised:
        identity_from_env("https://tb.example")
    assert "SPIFFE_ENDPOINT_SOCKET" in str(raised.value)
    assert "TASKBOUND_IDENTITY_TOKEN_FILE" in str(raised.value)

    monkeypatch.setenv("TASKBOUND_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    source = identity_from_env("https://tb.example")
    assert isinstance(source, TokenFile)
    assert source.path == tmp_path / "token"

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent.sock")
    source = identity_from_env("https://tb.example")  # the Workload API comes first
    assert isinstance(source, SpiffeWorkloadApi)
    assert (source.audience, source.socket) == (
        "https://tb.example",
        "unix:///run/spire/agent.sock",
    )

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "")  # set but empty: not chosen
    assert isinstance(identity_from_env("https://tb.example"), TokenFile)


async def test_a_client_without_an_identity_takes_it_from_the_environment(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    monkeypatch.delenv("TASKBOUND_IDENTITY_TOKEN_FILE", raising=False)
    async with Client(world.live.base) as client:
        with pytest.raises(IdentityUnavailable):
            await client.start_task("t", on_behalf_of="alice", scopes=READ)
    path = tmp_path / "token"
    path.write_text(await world.live.identity(AGENT))
    monkeypatch.setenv("TASKBOUND_IDENTITY_TOKEN_FILE", str(path))
    async with Client(world.live.base) as client:
        assert await start_and_call(client) == AGENT


# --- the development issuer and static tokens --------------------------------------------


async def test_the_development_issuer_refusing_is_identity_unavailable(world: World) -> None:
    wrong = DevIssuer(world.live.base, "tbat_not-an-admin-token", AGENT)
    async with Client(world.live.base, identity=wrong) as client:
        with pytest.raises(IdentityUnavailable, match=r"refused \(401\)"):
            await client.start_task("t", on_behalf_of="alice", scopes=READ)
    other_domain = DevIssuer(world.live.base, world.live.admin_token, "spiffe://evil.example/x")
    with pytest.raises(IdentityUnavailable, match=r"refused \(403\)"):
        await other_domain.token()
    gone = DevIssuer(f"http://127.0.0.1:{free_port()}", world.live.admin_token, AGENT)
    with pytest.raises(IdentityUnavailable, match="development issuer failed"):
        await gone.token()


async def test_the_development_issuer_caches_while_the_token_has_time_left(
    world: World,
) -> None:
    seen: list[str] = []

    async def count(request: httpx.Request) -> None:
        seen.append(request.url.path)

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as http:
        source = DevIssuer(world.live.base, world.live.admin_token, AGENT, http=http)
        first, second = await asyncio.gather(source.token(), source.token())
        assert first == second
        assert seen == ["/v1/admin/dev/identity"]
        short = DevIssuer(world.live.base, world.live.admin_token, AGENT, ttl_seconds=10, http=http)
        await short.token()
        await short.token()  # 10 s of life is inside the renewal margin: fetched again
        assert len(seen) == 3


async def test_a_static_token(world: World) -> None:
    with pytest.raises(IdentityUnavailable):
        StaticToken("")
    async with Client(world.live.base, identity=StaticToken(await world.live.identity())) as c:
        assert await start_and_call(c) == AGENT


# --- the SPIFFE Workload API -------------------------------------------------------------

WORKLOAD_HEADER = ("workload.spiffe.io", "true")


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """A stand-in for a SPIRE agent: the SPIFFE Workload API's ``FetchJWTSVID`` over gRPC
    on a unix socket, speaking the same protocol (the ``spiffe`` package's generated
    stubs) and checking requests as SPIRE does — the ``workload.spiffe.io: true`` security
    header, a non-empty audience, a requested SPIFFE ID that must be the workload's own.
    It does not attest the caller: it answers as the one workload ``spiffe_id``, with a
    JWT-SVID the live server's development issuer mints for the requested audience (SPIRE
    would sign with its own trust domain's key)."""

    def __init__(self, world: World, spiffe_id: str) -> None:
        self.base = f"http://127.0.0.1:{world.live.base.rsplit(':', 1)[1]}"
        self.admin = world.live.admin
        self.spiffe_id = spiffe_id
        self.fetched: list[list[str]] = []
        self.refuse: str | None = None

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        if WORKLOAD_HEADER not in tuple(context.invocation_metadata()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        audience = list(request.audience)
        if not audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != self.spiffe_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        if self.refuse is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, self.refuse)
        self.fetched.append(audience)
        # The test's event loop is free meanwhile: the SDK asks from a worker thread.
        r = httpx.post(
            f"{self.base}/v1/admin/dev/identity",
            json={"spiffe_id": self.spiffe_id, "audience": audience[0], "ttl_seconds": 300},
            headers=self.admin,
            timeout=10,
        )
        r.raise_for_status()
        svid = workload_pb2.JWTSVID(spiffe_id=self.spiffe_id, svid=r.json()["token"])
        return workload_pb2.JWTSVIDResponse(svids=[svid])


@contextlib.contextmanager
def workload_api(servicer: WorkloadApi, socket: Path) -> Iterator[str]:
    """The servicer on a unix socket; yields the ``SPIFFE_ENDPOINT_SOCKET`` address."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        yield f"unix://{socket}"
    finally:
        server.stop(grace=None).wait(5)


def socket_path(tmp_path: Path) -> Path:
    path = tmp_path / "agent.sock"
    assert len(str(path)) < 100, "a unix socket path must be short"
    return path


async def test_a_task_starts_with_a_jwt_svid_from_the_workload_api(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer = WorkloadApi(world, AGENT)
    with workload_api(servicer, socket_path(tmp_path)) as address:
        monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", address)
        async with Client(world.live.base) as client:  # identity_from_env
            assert isinstance(client.identity, SpiffeWorkloadApi)
            assert await start_and_call(client) == AGENT
            assert await start_and_call(client) == AGENT
        # The broker's identity audience, asked once: the SVID is kept while it is good.
        assert servicer.fetched == [[world.live.base]]


async def test_the_workload_api_checks_its_security_header(world: World, tmp_path: Path) -> None:
    servicer = WorkloadApi(world, AGENT)
    with workload_api(servicer, socket_path(tmp_path)) as address:

        def fetch(metadata: tuple[tuple[str, str], ...]) -> Any:
            with grpc.insecure_channel(address.replace("unix://", "unix:")) as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                request = workload_pb2.JWTSVIDRequest(audience=[world.live.base])
                return stub.FetchJWTSVID(request, metadata=metadata, timeout=5)

        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(fetch, ())
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header" in (refused.value.details() or "")
        answer = await asyncio.to_thread(fetch, (WORKLOAD_HEADER,))
        assert answer.svids[0].spiffe_id == AGENT
        assert servicer.fetched == [[world.live.base]]


async def test_a_workload_api_refusal_is_identity_unavailable(world: World, tmp_path: Path) -> None:
    servicer = WorkloadApi(world, AGENT)
    servicer.refuse = "no identity issued"
    with workload_api(servicer, socket_path(tmp_path)) as address:
        source = SpiffeWorkloadApi(world.live.base, socket=address, timeout=5)
        with pytest.raises(IdentityUnavailable, match="no identity issued"):
            await source.token()
    missing = SpiffeWorkloadApi(world.live.base, socket=f"unix://{tmp_path}/none.sock")
    with pytest.raises(IdentityUnavailable, match="SPIFFE Workload API failed"):
        await missing.token()
    assert servicer.fetched == []
