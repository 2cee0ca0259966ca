"""A toy issue tracker to put behind taskbound while trying the examples: an HTTP tool and
an MCP tool on loopback, registered by ``examples/quickstart.yaml``.

- HTTP on ``--port`` (default 9000): ``GET /api/repos/{org}/{repo}/issues``,
  ``POST /api/repos/{org}/{repo}/issues/{n}/comments``, ``DELETE /api/repos/{org}/{repo}``.
- MCP (streamable HTTP) on ``--mcp-port`` (default 9001) at ``/mcp``: ``search(project,
  query)``; needs ``pip install 'taskbound[mcp]'`` (without it, HTTP only).

Every request is printed with the credential it arrived with: the tool's own secret, which
taskbound's gateway injects (set in the registry), never an agent's credential. Run it in
a terminal of its own::

    python examples/toy_tool.py
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ISSUES = [
    {"n": 7, "title": "flaky test: test_checkout times out", "state": "open"},
    {"n": 9, "title": "login page 500s on empty password", "state": "open"},
]


def show(request: Request, what: str) -> None:
    secret = request.headers.get("authorization") or request.headers.get("x-api-key")
    print(f"{request.method} {request.url.path} -> {what} (arrived with: {secret!r})", flush=True)


async def list_issues(request: Request) -> JSONResponse:
    show(request, "issues listed")
    p = request.path_params
    return JSONResponse({"repo": f"{p['org']}/{p['repo']}", "issues": ISSUES})


async def comment(request: Request) -> JSONResponse:
    body = await request.body()
    show(request, f"comment {body.decode(errors='replace')[:80]!r}")
    return JSONResponse({"ok": True}, status_code=201)


async def delete_repo(request: Request) -> JSONResponse:
    show(request, "repository deleted (not really)")
    return JSONResponse({"deleted": f"{request.path_params['org']}/{request.path_params['repo']}"})


def http_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/api/repos/{org}/{repo}/issues", list_issues, methods=["GET"]),
            Route("/api/repos/{org}/{repo}/issues/{n}/comments", comment, methods=["POST"]),
            Route("/api/repos/{org}/{repo}", delete_repo, methods=["DELETE"]),
        ]
    )


def mcp_app() -> Any | None:
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:
        print("no mcp package: serving the HTTP tool only (pip install 'taskbound[mcp]')")
        return None
    server = MCPServer("tracker")

    @server.tool()
    def search(project: str, query: str = "") -> str:
        """Search the issues of a project."""
        print(f"MCP search(project={project!r}, query={query!r})", flush=True)
        found = [i for i in ISSUES if query.lower() in str(i["title"]).lower()]
        return f"{len(found)} issue(s) in {project} matching {query!r}"

    return server.streamable_http_app(stateless_http=True)


async def main(args: argparse.Namespace) -> None:
    servers = [uvicorn.Server(uvicorn.Config(http_app(), host="127.0.0.1", port=args.port))]
    print(f"HTTP tool: http://127.0.0.1:{args.port}/api")
    mcp = mcp_app()
    if mcp is not None:
        servers.append(uvicorn.Server(uvicorn.Config(mcp, host="127.0.0.1", port=args.mcp_port)))
        print(f"MCP tool:  http://127.0.0.1:{args.mcp_port}/mcp")
    await asyncio.gather(*(s.serve() for s in servers))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--mcp-port", type=int, default=9001)
    asyncio.run(main(p.parse_args()))
