"""The agent SDK: task-bound credentials with less code than a blanket token.

``Client`` (async) and ``SyncClient`` start tasks, hold their credentials (one per tool
and tier, bound to a DPoP key made for the task), call tools through the gateway over
HTTP (``httpx``) or MCP (the official ``mcp`` client), wait for approvals, delegate to
sub-agents, and end the task when the code that needed it is done. See
docs/sdk-quickstart.md.
"""

from taskbound.sdk.client import Client, Credential, Delegated, Delegation, Task
from taskbound.sdk.errors import (
    ApprovalDenied,
    ApprovalRequired,
    IdentityUnavailable,
    NotGranted,
    Refused,
    ServiceUnavailable,
    TaskboundClientError,
    TaskEnded,
    Unauthorized,
)
from taskbound.sdk.identity import (
    DevIssuer,
    IdentitySource,
    SpiffeWorkloadApi,
    StaticToken,
    TokenFile,
    identity_from_env,
)
from taskbound.sdk.sync import SyncClient, SyncTask

__all__ = [
    "ApprovalDenied",
    "ApprovalRequired",
    "Client",
    "Credential",
    "Delegated",
    "Delegation",
    "DevIssuer",
    "IdentitySource",
    "IdentityUnavailable",
    "NotGranted",
    "Refused",
    "ServiceUnavailable",
    "SpiffeWorkloadApi",
    "StaticToken",
    "SyncClient",
    "SyncTask",
    "Task",
    "TaskEnded",
    "TaskboundClientError",
    "TokenFile",
    "Unauthorized",
    "identity_from_env",
]
