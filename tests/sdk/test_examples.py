"""The runnable examples (examples/*.py), each run as its own process against a live
server, as a developer runs them: exit code 0 and the lines that show what they claim."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml

from taskbound.service.registry import RegistryDocument
from tests.api.conftest import AGENT, free_port
from tests.gateway.conftest import UPSTREAM_SECRET, World
from tests.sdk.conftest import HELPER

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def served(world: World) -> World:
    """The SDK's test world (approvers bob and carol, the sub-agent ``HELPER``; its
    revocation feed followed, so that examples taking seconds are served)."""
    return world


async def run(world: World, example: str, *args: str, spiffe_id: str = AGENT) -> str:
    """Run ``examples/<example>`` in a process of its own (the server keeps serving on
    this loop meanwhile); its standard output, after checking it exited 0."""
    code, out, err = await run_process(world, example, *args, spiffe_id=spiffe_id)
    assert code == 0, f"{example} exited {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    return out


async def run_process(
    world: World, example: str, *args: str, spiffe_id: str = AGENT
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / example),
        "--base-url", world.live.base,
        "--admin-token", world.live.admin_token,
        "--spiffe-id", spiffe_id,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def upstream_paths(world: World) -> list[str]:
    return [f"{seen['method']} {seen['path']}" for seen in world.echo.seen]


async def test_http_agent(served: World) -> None:
    out = await run(served, "http_agent.py")

    assert "granted issues:read actions=['list_issues']" in out
    assert "GET /repos/acme/web/issues -> 200" in out
    assert "GET /repos/acme/elsewhere/issues -> refused: policy_denied" in out
    assert out.rstrip().endswith("is completed")
    # Only the allowed call reached the tool, with the tool's own secret.
    assert upstream_paths(served) == ["GET /api/repos/acme/web/issues"]
    assert served.echo.seen[0]["headers"]["authorization"] == UPSTREAM_SECRET


async def test_an_example_exits_1_when_taskbound_refuses(served: World) -> None:
    code, out, err = await run_process(
        served, "http_agent.py", spiffe_id="spiffe://taskbound.local/agents/nobody"
    )

    assert code == 1, out
    assert "error: unknown_agent" in err
    assert served.echo.seen == []


async def test_mcp_agent(served: World) -> None:
    out = await run(served, "mcp_agent.py")

    assert "tools/list -> search\n" in out  # only what the read credential may call
    assert "search('WEB') -> 3 issues in WEB matching 'flaky'" in out
    assert "search('OTHER') -> refused: policy_denied" in out
    assert served.mcp_calls == [{"tool": "search", "project": "WEB", "query": "flaky"}]


async def test_orchestrator_and_subagent(served: World) -> None:
    out = await run(served, "orchestrator.py", "--subagent-spiffe-id", HELPER)

    lines = out.splitlines()
    assert "orchestrator: GET /repos/acme/web/issues -> 200" in lines
    assert "orchestrator: GET /repos/acme/api/issues -> 200" in lines
    assert "  [sub-agent] accepted issues:read repo=web bound to my own key" in lines
    assert "  [sub-agent] GET /repos/acme/web/issues -> 200" in lines
    assert (
        "  [sub-agent] GET /repos/acme/api/issues -> refused: policy_denied "
        "(outside the delegated scope)"
    ) in lines
    assert "sub-agent exited with 0" in lines
    assert "is completed" in lines[-1]
    assert upstream_paths(served) == [
        "GET /api/repos/acme/web/issues",
        "GET /api/repos/acme/api/issues",
        "GET /api/repos/acme/web/issues",
    ]
    # The sub-agent's call was its own: a credential held by the helper, exchanged from
    # the orchestrator's.
    task_id = lines[0].split()[1]
    r = await served.live.http.get(
        f"/v1/admin/tasks/{task_id}/credentials", headers=served.live.admin
    )
    assert r.status_code == 200, r.text
    delegated = [c for c in r.json()["credentials"] if c.get("parent_jti")]
    assert len(delegated) == 1, r.json()


async def test_approval_agent(served: World) -> None:
    out = await run(served, "approval_agent.py", "--approver", "bob", "--approver", "carol")

    assert "DELETE /repos/acme/web -> held: approval_required, approval apr_" in out
    assert "bob approves (1/2): pending" in out
    assert "carol approves (2/2): approved" in out
    assert "DELETE /repos/acme/web again, approved -> 200" in out
    assert "DELETE /repos/acme/web once more -> held again: approval apr_" in out
    # Approved once, made once.
    assert upstream_paths(served) == ["DELETE /api/repos/acme/web"]


async def test_langchain_agent(served: World) -> None:
    out = await run(served, "langchain_agent.py")

    assert "tool issues_list_issues: arguments ['org', 'repo']" in out
    assert 'issues_list_issues(web) -> success: {"ok":true' in out
    assert (
        "issues_list_issues(elsewhere) -> error: taskbound refused the call: policy_denied" in out
    )
    assert (
        "issues_delete_repo(web) -> raised TaskboundToolError (ApprovalRequired): "
        "approval_required: this call waits for a person's approval (apr_"
    ) in out
    assert upstream_paths(served) == ["GET /api/repos/acme/web/issues"]


@pytest.mark.parametrize("name", ["quickstart.yaml", "registry.yaml"])
def test_the_example_registries_are_valid(name: str) -> None:
    RegistryDocument.model_validate(yaml.safe_load((EXAMPLES / name).read_text()))


async def test_the_toy_tool_serves_the_examples(served: World) -> None:
    """examples/toy_tool.py, the tools of the quickstart, behind the live server."""
    port, mcp_port = free_port(), free_port()
    toy = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "toy_tool.py"),
        "--port", str(port), "--mcp-port", str(mcp_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await until_listening(port, mcp_port)
        base, bot = served.live.base, "spiffe://taskbound.local/agents/toy-bot"
        doc = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
        issues, tracker = doc["tools"]
        issues.update(id="toy", audience=f"{base}/toy", upstream_url=f"http://127.0.0.1:{port}/api")
        tracker.update(
            id="toytracker",
            audience=f"{base}/toytracker",
            upstream_url=f"http://127.0.0.1:{mcp_port}/mcp",
        )
        ceiling = [{"tool": "toy", "tier": "read"}, {"tool": "toytracker", "tier": "read"}]
        apply = {
            "tools": [issues, tracker],
            "agents": [{"spiffe_id": bot, "owner": "alice", "ceiling": ceiling}],
        }
        r = await served.live.http.post("/v1/admin/apply", json=apply, headers=served.live.admin)
        assert r.status_code == 200, r.text

        out = await run(served, "http_agent.py", "--tool", "toy", spiffe_id=bot)
        assert '"title":"flaky test: test_checkout times out"' in out
        out = await run(served, "mcp_agent.py", "--tool", "toytracker", spiffe_id=bot)
        assert "search('WEB') -> 1 issue(s) in WEB matching 'flaky'" in out
    finally:
        toy.terminate()
        printed, _ = await toy.communicate()
    # The toy saw the secret the gateway holds, never an agent's credential.
    assert (
        "GET /api/repos/acme/web/issues -> issues listed (arrived with: 'Bearer toy-tool-secret')"
        in printed.decode()
    )
    assert "MCP search(project='WEB', query='flaky')" in printed.decode()


async def until_listening(*ports: int) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    for port in ports:
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, f"nothing on port {port}"
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
