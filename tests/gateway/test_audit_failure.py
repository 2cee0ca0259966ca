"""A call whose audit record cannot be written fails (503 ``audit_unavailable``), it never
passes unrecorded; with the store failing for real, no mock of the storage:

* PostgreSQL: the server connects as a role of its own, and INSERT on ``audit_events`` is
  revoked from that role while it runs (as a wrong grant or a read-only failover would);
* SQLite: another connection holds the database's write lock past the busy timeout.

What this pins is what the gateway guarantees (DESIGN.md invariant 2, "no response to an
agent call without a durable audit record of it"): the record of an allowed call holds the
upstream's status, so it is written after the upstream answered — the upstream HAS
received the call — but the agent gets the 503, never the upstream's answer. A refusal is
recorded before it is answered, so it too becomes a 503. Once the store takes records
again, calls pass, and the chain has no record of the failed calls and still verifies.

And one unrecordable call (an MCP tool name holding a NUL character, which no store can
keep) fails only itself, never the calls that would have shared its group commit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from taskbound.core.clock import FakeClock
from taskbound.storage.migrate import migrate
from tests.api.conftest import Agent, free_port, make_settings, start_live
from tests.services import postgres_conninfo, postgres_url
from tests.storage.conftest import with_search_path

from .conftest import Echo, World, call_headers, echo_app, registry, serve

LIST = "/issues/repos/acme/web/issues"
DENIED = "/issues/repos/evil/web/issues"  # outside the task's constraints: refused
MCP = "/tracker"


async def get(world: World, agent: Agent, token: str, path: str) -> httpx.Response:
    return await world.live.http.get(path, headers=call_headers(agent, token, "GET", path))


def unavailable(r: httpx.Response) -> bool:
    return r.status_code == 503 and r.json()["code"] == "audit_unavailable"


async def chain_verifies(world: World) -> None:
    r = await world.live.http.get("/v1/admin/audit/verify", headers=world.live.admin)
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True, r.json()


async def call_records(world: World, task_id: str) -> list[tuple[str, str | None]]:
    found = await world.live.services.storage.list_audit(task=task_id, limit=1000)
    return [(e.decision, e.code) for _, e in found if e.event == "gateway.call"]


# --- PostgreSQL: INSERT on audit_events revoked ----------------------------------------------


@contextmanager
def restricted_role(base_url: str) -> Iterator[tuple[str, str, str]]:
    """A new schema and a new login role that may read and write its tables (and no
    more); yields (the role's URL, the schema, the role). Both are dropped after."""
    schema, role = f"tb_{secrets.token_hex(6)}", f"tb_audit_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(16)
    root = postgres_conninfo(base_url)
    with psycopg.connect(root, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    url = (
        make_url(with_search_path(base_url, schema))
        .set(username=role, password=password)
        .render_as_string(hide_password=False)
    )
    try:
        yield url, schema, role
    finally:
        with psycopg.connect(root, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def as_root(base_url: str, statement: sql.Composed) -> None:
    with psycopg.connect(postgres_conninfo(base_url), autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
async def postgres_world(
    tmp_path: Path, clock: FakeClock
) -> AsyncIterator[tuple[World, sql.Identifier, sql.Identifier]]:
    """A live server on PostgreSQL connected as its own role (the schema migrated by the
    test's superuser first); yields the world, its audit table and the role."""
    base = postgres_url()
    echo = Echo(f"http://127.0.0.1:{free_port()}")
    upstream, serving = await serve(echo_app(echo), int(echo.base.rsplit(":", 1)[1]))
    try:
        with restricted_role(base) as (url, schema, role):
            await migrate(with_search_path(base, schema))
            ident, who = sql.Identifier(schema), sql.Identifier(role)
            for grant in (
                "GRANT USAGE ON SCHEMA {} TO {}",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}",
                "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {} TO {}",
            ):
                as_root(base, sql.SQL(grant).format(ident, who))
            settings = make_settings(tmp_path, storage={"url": url})
            async for live in start_live(settings, clock, registry=False):
                # The MCP tool of the registry is never called here.
                doc = registry(echo.base, "http://127.0.0.1:9/mcp", live.base)
                r = await live.http.post("/v1/admin/apply", json=doc, headers=live.admin)
                assert r.status_code == 200, r.text
                yield World(live, echo, []), sql.Identifier(schema, "audit_events"), who
    finally:
        upstream.should_exit = True
        await serving


@pytest.mark.postgres
async def test_insert_revoked_on_postgres_fails_calls_with_503(
    postgres_world: tuple[World, sql.Identifier, sql.Identifier],
) -> None:
    world, table, role = postgres_world
    base = postgres_url()
    agent, t = await world.task(("issues", "read"))
    token, task_id = t["creds"]["issues:read"], t["task"]["id"]
    assert (await get(world, agent, token, LIST)).status_code == 200
    assert len(world.echo.seen) == 1

    as_root(base, sql.SQL("REVOKE INSERT ON {} FROM {}").format(table, role))
    r = await get(world, agent, token, LIST)
    assert unavailable(r), r.text
    assert "ok" not in r.json()  # the upstream's answer never leaves unrecorded
    # Forwarded before its record was attempted (the record holds the upstream status).
    assert len(world.echo.seen) == 2
    r = await get(world, agent, token, DENIED)
    assert unavailable(r), r.text  # a refusal must be recorded before it is answered
    assert len(world.echo.seen) == 2

    as_root(base, sql.SQL("GRANT INSERT ON {} TO {}").format(table, role))
    assert (await get(world, agent, token, LIST)).status_code == 200
    assert len(world.echo.seen) == 3
    # Only the calls that were answered are in the audit; the chain is whole.
    assert await call_records(world, task_id) == [("allow", None), ("allow", None)]
    await chain_verifies(world)


# --- SQLite: the write lock held by another connection ---------------------------------------


async def test_a_locked_sqlite_database_fails_calls_with_503(world: World) -> None:
    agent, t = await world.task(("issues", "read"))
    token, task_id = t["creds"]["issues:read"], t["task"]["id"]
    assert (await get(world, agent, token, LIST)).status_code == 200

    path = world.live.services.settings.storage.data_dir / "taskbound.db"
    assert path.exists()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held past the busy timeout
        r = await get(world, agent, token, LIST)
        assert unavailable(r), r.text
        assert "ok" not in r.json()
        assert len(world.echo.seen) == 2  # forwarded, then refused: see the docstring
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert (await get(world, agent, token, LIST)).status_code == 200
    assert await call_records(world, task_id) == [("allow", None), ("allow", None)]
    await chain_verifies(world)


# --- one unrecordable call fails alone ---------------------------------------------------------


async def test_an_unrecordable_call_does_not_fail_the_calls_committed_with_it(
    world: World,
) -> None:
    """MCP calls naming a tool with a NUL character, sent over and over while another task
    makes ordinary calls: each of those records would share a group commit with theirs."""
    agent, t = await world.task(("tracker", "read"))
    bad_token = t["creds"]["tracker:read"]
    good_agent, g = await world.task(("issues", "read"))
    good_token = g["creds"]["issues:read"]
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "wipe\u0000", "arguments": {"project": "WEB"}},
        }
    ).encode()
    done = asyncio.Event()

    async def unrecordable() -> list[int]:
        statuses = []
        while not done.is_set():
            h = call_headers(agent, bad_token, "POST", MCP)
            h.update({"Content-Type": "application/json", "Accept": "application/json"})
            statuses.append((await world.live.http.post(MCP, content=body, headers=h)).status_code)
        return statuses

    async def ordinary() -> list[int]:
        return [(await get(world, good_agent, good_token, LIST)).status_code for _ in range(10)]

    spoilers = [asyncio.create_task(unrecordable()) for _ in range(8)]
    try:
        results = await asyncio.gather(*(ordinary() for _ in range(8)))
    finally:
        done.set()
        refused = [s for statuses in await asyncio.gather(*spoilers) for s in statuses]
    assert [s for statuses in results for s in statuses] == [200] * 80
    # The unknown tool names are now recorded escaped (the refusal is audited); none of
    # them reaches the MCP server whatever status the JSON-RPC answer carries.
    assert refused
    assert world.mcp_calls == []  # none reached the MCP server
    assert len(await call_records(world, g["task"]["id"])) == 80
    await chain_verifies(world)
