"""What every example agent takes on its command line, and where its identity comes from.

``--base-url`` (or ``TASKBOUND_URL``) is the taskbound server; ``--spiffe-id`` the agent's
SPIFFE ID; ``--admin-token`` (or ``TASKBOUND_ADMIN_TOKEN``) is only used to mint a
development identity (``DevIssuer``) — without it the agent uses its real workload
identity (``SPIFFE_ENDPOINT_SOCKET`` or ``TASKBOUND_IDENTITY_TOKEN_FILE``).
"""

from __future__ import annotations

import argparse
import os

from taskbound.sdk import DevIssuer, IdentitySource


def parser(doc: str, spiffe_id: str, *, owner: bool = True) -> argparse.ArgumentParser:
    """The common options; an example adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--base-url", default=os.environ.get("TASKBOUND_URL", "http://127.0.0.1:8080"))
    p.add_argument("--admin-token", default=os.environ.get("TASKBOUND_ADMIN_TOKEN"))
    p.add_argument("--spiffe-id", default=spiffe_id)
    if owner:
        p.add_argument("--owner", default="alice", help="the person the task is on behalf of")
    return p


def identity(args: argparse.Namespace) -> IdentitySource | None:
    """A development identity when an admin token is given; else the process's own
    (``None`` lets the client find it in the environment)."""
    if args.admin_token:
        return DevIssuer(args.base_url, args.admin_token, args.spiffe_id)
    return None
