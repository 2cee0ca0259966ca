"""LangChain tools whose every call goes through a taskbound task.

:func:`http_tool` turns one action of a taskbound HTTP tool into a LangChain
``StructuredTool``. Each invocation is a real call with the task's credential through the
gateway, so an LLM agent's tool calls are checked at the boundary like any other: the
model never sees a credential, and what policy refuses stays refused::

    async with client.task(...) as task:
        list_issues = http_tool(
            task, "issues", "list_issues",
            tier="read", method="GET", path="/repos/{org}/{repo}/issues",
            description="List the open issues of a repository.",
        )
        agent = create_agent(model, tools=[list_issues])

The path's ``{parameters}`` are the tool's arguments (a schema of your own, ``args_schema``,
may add more: the query of a ``GET``/``DELETE``, the JSON body otherwise). A refusal by
taskbound raises :class:`TaskboundToolError`, a LangChain ``ToolException`` whose message
names the stable code; with ``handle_errors=True`` the model reads that message as the
tool's answer instead. A call held for approval was not made: the error's ``error`` is the
:class:`~taskbound.sdk.ApprovalRequired`, so ``await task.retry_when_approved(e.error)``
makes the same call once a person approves it — or the agent calls the tool again with the
same arguments later.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field, create_model

from taskbound.sdk import ApprovalRequired, Delegated, Task, TaskboundClientError
from taskbound.sdk.sync import SyncHolder

__all__ = ["TaskboundToolError", "http_tool"]

_PATH_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
#: How much of a tool's error answer the model gets to read.
_MAX_ERROR_TEXT = 1000


class TaskboundToolError(ToolException):
    """taskbound refused the call (or could not make it). ``code`` is the stable code
    (``policy_denied``, ``approval_required``, ``insufficient_scope``…), ``error`` the
    SDK's typed error."""

    def __init__(self, error: TaskboundClientError) -> None:
        if isinstance(error, ApprovalRequired):
            message = (
                f"approval_required: this call waits for a person's approval "
                f"({error.approval_id}) and was not made; call the tool again with the same "
                "arguments once it is approved"
            )
        else:
            message = f"taskbound refused the call: {error}"
        super().__init__(message)
        self.error = error
        self.code = error.code


def http_tool(
    task: Task | Delegated | SyncHolder,
    tool: str,
    action: str,
    *,
    tier: str,
    method: str,
    path: str,
    description: str | None = None,
    name: str | None = None,
    args_schema: type[BaseModel] | None = None,
    handle_errors: bool = False,
) -> StructuredTool:
    """A ``StructuredTool`` for ``action`` of the taskbound HTTP ``tool``, as the registry
    declares it: its ``tier`` (which of the task's credentials it uses), ``method`` and
    ``path`` template (relative to the tool). An async task gives an async tool
    (``ainvoke``), a ``SyncTask`` or sync delegated credential a sync one (``invoke``).
    ``name`` defaults to ``<tool>_<action>``."""
    method = method.upper()
    parameters = _PATH_PARAMETER.findall(path)
    if args_schema is None:
        args_schema = _path_schema(f"{tool}_{action}_arguments", parameters)
    elif missing := set(parameters) - set(args_schema.model_fields):
        raise ValueError(f"args_schema lacks the path parameters {sorted(missing)}")

    def request(arguments: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        url = _PATH_PARAMETER.sub(lambda m: _segment(arguments[m.group(1)]), path)
        rest = {k: v for k, v in arguments.items() if k not in parameters and v is not None}
        if not rest:
            return url, {}
        return url, {"params": rest} if method in _QUERY_METHODS else {"json": rest}

    if isinstance(task, SyncHolder):
        sync_task = task

        def call_sync(**arguments: Any) -> str:
            url, extra = request(arguments)
            try:
                with sync_task.http(tool, tier) as client:
                    response = client.request(method, url, **extra)
            except ApprovalRequired as held:
                # The held call's client is closed: re-sending is calling the tool again
                # (synchronously: SyncTask.retry_when_approved calls it so).
                resend: Any = functools.partial(call_sync, **arguments)
                held.resend = resend
                raise TaskboundToolError(held) from held
            except TaskboundClientError as exc:
                raise TaskboundToolError(exc) from exc
            return _answer(response)

        func, coroutine = call_sync, None
    else:
        async_task = task

        async def call(**arguments: Any) -> str:
            url, extra = request(arguments)
            try:
                async with async_task.http(tool, tier) as client:
                    response = await client.request(method, url, **extra)
            except ApprovalRequired as held:
                # The held call's client is closed: re-sending is calling the tool again.
                held.resend = functools.partial(call, **arguments)
                raise TaskboundToolError(held) from held
            except TaskboundClientError as exc:
                raise TaskboundToolError(exc) from exc
            return _answer(response)

        func, coroutine = None, call

    return StructuredTool.from_function(
        func=func,
        coroutine=coroutine,
        name=name or f"{tool}_{action}",
        description=description or f"{action}: {method} {path} on {tool}, through taskbound",
        args_schema=args_schema,
        handle_tool_error=handle_errors,
    )


def _path_schema(name: str, parameters: list[str]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        p: (str, Field(description=f"the {p} of the request path")) for p in parameters
    }
    return create_model(name, **fields)


def _segment(value: object) -> str:
    """One path segment from a model-chosen value: ``/`` and friends escaped, so an
    argument can never reach another path of the tool."""
    text = str(value)
    if text in ("", ".", ".."):
        raise ToolException(f"{text!r} is not a valid path segment")
    return quote(text, safe="")


def _answer(response: httpx.Response) -> str:
    """The tool's answer for the model; an error answer of the tool is a tool error."""
    if response.is_success:
        return response.text
    raise ToolException(
        f"the tool answered HTTP {response.status_code}: {response.text[:_MAX_ERROR_TEXT]}"
    )
