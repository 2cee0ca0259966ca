"""The synchronous client: the async client run on a private event loop thread, for agent
code that is not async. Same behaviour: ``with client.task(...) as task`` ends the task on
the way out (completed, or cancelled when the block raises), ``task.http(tool)`` is an
``httpx.Client`` signing every request.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from taskbound.sdk._dpop import resent_with_nonce
from taskbound.sdk.client import (
    Client,
    Delegated,
    Delegation,
    Scope,
    Task,
    _end_quietly,
    might_be_refusal,
    refusal_body,
)
from taskbound.sdk.errors import ApprovalRequired, TaskboundClientError, error_from

__all__ = ["SyncClient", "SyncHolder", "SyncTask"]


class SyncHolder:
    """A task or delegated credential, driven from synchronous code."""

    def __init__(self, portal: BlockingPortal, holder: Task | Delegated) -> None:
        self._portal = portal
        self._holder = holder

    @property
    def jkt(self) -> str:
        return self._holder.jkt

    def credential(self, tool: str, tier: str | None = None) -> str:
        return self._portal.call(self._holder.credential, tool, tier)

    def http(self, tool: str, tier: str | None = None, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` for ``tool`` through the gateway (see ``Task.http``)."""
        picked = self._holder._pick(tool, tier)
        options = dict(kwargs)
        client: httpx.Client

        def raise_refusals(response: httpx.Response) -> None:
            if not might_be_refusal(response) or resent_with_nonce(self._holder._key, response):
                return
            response.read()
            body = refusal_body(response)
            if body is None:
                return
            err = error_from(response.status_code, body)
            if isinstance(err, ApprovalRequired):
                err.resend = _resender(
                    client, response.request, lambda: self.http(tool, tier, **options)
                )
            raise err

        client = httpx.Client(
            **self._holder._client_options(
                tool, picked, raise_refusals, kwargs, sync_token=lambda: self.credential(*picked)
            )
        )
        return client

    def delegate(
        self,
        tool: str,
        tier: str | None = None,
        *,
        actions: Sequence[str] | None = None,
        constraints: Mapping[str, Any] | None = None,
    ) -> Delegation:
        call = functools.partial(
            self._holder.delegate, tool, tier, actions=actions, constraints=constraints
        )
        return self._portal.call(call)


class SyncTask(SyncHolder):
    _holder: Task

    @property
    def id(self) -> str:
        return self._holder.id

    @property
    def granted(self) -> list[dict[str, Any]]:
        return self._holder.granted

    @property
    def denied(self) -> list[dict[str, Any]]:
        return self._holder.denied

    def state(self) -> dict[str, Any]:
        return self._portal.call(self._holder.state)

    def complete(self, reason: str = "") -> None:
        self._portal.call(self._holder.complete, reason)

    def cancel(self, reason: str = "") -> None:
        self._portal.call(self._holder.cancel, reason)

    def wait_for_approval(
        self, approval: ApprovalRequired | str, *, within: float = 300
    ) -> dict[str, Any]:
        call = functools.partial(self._holder.wait_for_approval, approval, within=within)
        return self._portal.call(call)

    def retry_when_approved(self, held: ApprovalRequired, *, within: float = 300) -> Any:
        if held.resend is None:
            raise TaskboundClientError("not_resendable", "this refusal has no call to re-send")
        self.wait_for_approval(held, within=within)
        return held.resend()


class SyncClient:
    """``Client`` for synchronous code; close it (or use ``with``) to stop its thread."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._client = self._portal.call(_make, base_url, kwargs)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._portal.call(self._client.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def start_task(self, intent: str, **kwargs: Any) -> SyncTask:
        task = self._portal.call(functools.partial(self._client.start_task, intent, **kwargs))
        return SyncTask(self._portal, task)

    @contextlib.contextmanager
    def task(
        self,
        intent: str,
        *,
        on_behalf_of: str,
        scopes: Iterable[Scope],
        ttl_seconds: int = 600,
        constraints: Mapping[str, Any] | None = None,
        may_act: str | None = None,
    ) -> Iterator[SyncTask]:
        """Like ``Client.task``: ended on the way out, cancelled when the block raises."""
        task = self.start_task(
            intent,
            on_behalf_of=on_behalf_of,
            scopes=list(scopes),
            ttl_seconds=ttl_seconds,
            constraints=constraints,
            may_act=may_act,
        )
        try:
            yield task
        except BaseException as exc:
            reason = f"the agent's code stopped: {type(exc).__name__}"
            self._portal.call(_end_quietly, task._holder, "cancel", reason)
            raise
        else:
            if not task._holder.ended:
                self._portal.call(_end_quietly, task._holder, "complete", "")

    def accept(self, delegation: Delegation | str) -> SyncHolder:
        return SyncHolder(self._portal, self._portal.call(self._client.accept, delegation))


async def _make(base_url: str, kwargs: dict[str, Any]) -> Client:
    return Client(base_url, **kwargs)


def _resender(
    client: httpx.Client, request: httpx.Request, reopen: Callable[[], httpx.Client]
) -> Any:
    """The synchronous twin of ``client._resender``."""
    method, url, content = request.method, request.url, request.content
    headers = {
        k: v for k, v in request.headers.items() if k.lower() not in ("authorization", "dpop")
    }

    def again() -> httpx.Request:
        return httpx.Request(method, url, content=content, headers=headers)

    def resend() -> httpx.Response:
        if not client.is_closed:
            return client.send(again())
        with reopen() as fresh:
            response = fresh.send(again())
            response.read()
            return response

    return resend
