"""The async client: task-bound credentials with less code than a blanket token.

::

    async with Client("https://taskbound.example", identity=TokenFile(path)) as tb:
        async with tb.task(
            intent="triage the flaky-test issues",
            on_behalf_of="alice",
            scopes=[("issues", "read")],
        ) as task:
            issues = task.http("issues")
            r = await issues.get("/repos/acme/web/issues")

Leaving the ``async with task`` block ends the task — completed when the block finishes,
cancelled when it raises or is cancelled — so every credential dies with the code that
needed it. Credentials are refreshed before they expire; the DPoP key is made for the
task and never leaves memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import httpx

from taskbound.core.exchange import Narrowing, narrowing_digest
from taskbound.sdk._dpop import REFUSAL_HEADER, DPoPKey, TokenAuth, httpx2_auth, resent_with_nonce
from taskbound.sdk.errors import (
    PROBLEM_TYPE,
    ApprovalDenied,
    ApprovalRequired,
    NotGranted,
    TaskboundClientError,
    TaskEnded,
    error_from,
)
from taskbound.sdk.identity import IdentitySource, identity_from_env

if TYPE_CHECKING:
    from mcp.client.session import ClientSession

__all__ = ["Client", "Credential", "Delegated", "Delegation", "Task"]

log = logging.getLogger("taskbound.sdk")

#: A credential this close to its expiry is replaced before it is used (or, for a
#: credential that lives less than four times as long, a quarter of its lifetime).
REFRESH_BEFORE_S = 30.0
#: The longest single long poll of an approval (the server's bound).
_APPROVAL_POLL_S = 30.0
_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
_JWT = "urn:ietf:params:oauth:token-type:jwt"

Scope = tuple[str, str] | Mapping[str, Any]


@dataclass
class Credential:
    """One credential: one tool, one tier, minutes of life."""

    tool: str
    tier: str
    access_token: str = field(repr=False)
    expires_at: float
    actions: tuple[str, ...] = ()
    jti: str = ""
    lifetime: float = 0.0  # seconds, as issued

    @classmethod
    def from_answer(cls, body: Mapping[str, Any], now: float) -> Credential:
        lifetime = float(body["expires_in"])
        return cls(
            tool=str(body["tool"]),
            tier=str(body["tier"]),
            access_token=str(body["access_token"]),
            expires_at=now + lifetime,
            actions=tuple(body.get("actions") or ()),
            jti=str(body.get("jti", "")),
            lifetime=lifetime,
        )

    def fresh(self, now: float) -> bool:
        """Good for a while yet: not within the refresh margin of its expiry. A short-lived
        credential (a server with a small ``max_ttl_seconds``) is kept for three quarters
        of its life rather than refreshed before every call."""
        margin = min(REFRESH_BEFORE_S, self.lifetime / 4) if self.lifetime > 0 else REFRESH_BEFORE_S
        return now < self.expires_at - margin


def _without_token(credential: Any) -> Any:
    if not isinstance(credential, Mapping):
        return credential
    return {k: v for k, v in credential.items() if k != "access_token"}


def _scope_body(scope: Scope) -> dict[str, Any]:
    if isinstance(scope, Mapping):
        return dict(scope)
    tool, tier = scope
    return {"tool": tool, "tier": tier}


async def _answer(response: httpx.Response, *expected: int) -> Any:
    """The JSON of an expected answer, else the typed error for it."""
    body: Any = None
    with contextlib.suppress(ValueError):
        body = response.json() if response.content else None
    if response.status_code in expected:
        return body
    raise error_from(response.status_code, body)


class _Holder:
    """What a task and a delegated credential share: a DPoP key, credentials by (tool,
    tier), and the clients that call tools with them."""

    def __init__(self, client: Client, key: DPoPKey) -> None:
        self._client = client
        self._key = key
        self._credentials: dict[tuple[str, str], Credential] = {}

    @property
    def jkt(self) -> str:
        """The thumbprint of this holder's DPoP key (``cnf.jkt`` of its credentials)."""
        return self._key.jkt

    def credentials(self) -> list[Credential]:
        return list(self._credentials.values())

    def _pick(self, tool: str, tier: str | None) -> tuple[str, str]:
        tiers = sorted(t for (name, t) in self._credentials if name == tool)
        if tier is not None:
            if (tool, tier) not in self._credentials:
                raise NotGranted(f"no {tool}:{tier} credential (held: {self._held()})")
            return tool, tier
        if len(tiers) == 1:
            return tool, tiers[0]
        if not tiers:
            raise NotGranted(f"no credential for tool {tool!r} (held: {self._held()})")
        raise NotGranted(f"{tool} is held at tiers {', '.join(tiers)}: say which (tier=…)")

    def _held(self) -> str:
        return ", ".join(f"{a}:{b}" for a, b in sorted(self._credentials)) or "none"

    async def credential(self, tool: str, tier: str | None = None) -> str:
        """A current credential for ``tool`` (at ``tier``, needed when several are held)."""
        return self._credentials[self._pick(tool, tier)].access_token

    def _tool_url(self, tool: str) -> str:
        return f"{self._client.gateway_url}/{tool}"

    def http(self, tool: str, tier: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for ``tool`` through the gateway: relative URLs are the
        tool's own paths; every request carries the credential and a fresh DPoP proof. A
        refusal by the gateway raises its typed error (:class:`ApprovalRequired`…); the
        tool's own answers, errors included, come back as they are. A URL outside the
        tool (another host, another tool) is refused before anything is sent
        (``wrong_destination``)."""
        picked = self._pick(tool, tier)
        options = dict(kwargs)
        client: httpx.AsyncClient

        async def raise_refusals(response: httpx.Response) -> None:
            if resent_with_nonce(self._key, response):
                return
            body = await _refusal(response)
            if body is None:
                return
            err = error_from(response.status_code, body)
            if isinstance(err, ApprovalRequired):
                err.resend = _resender(
                    client, response.request, lambda: self.http(tool, tier, **options)
                )
            raise err

        client = httpx.AsyncClient(**self._client_options(tool, picked, raise_refusals, kwargs))
        return client

    def _client_options(
        self,
        tool: str,
        picked: tuple[str, str],
        hook: Callable[[httpx.Response], Any],
        kwargs: Mapping[str, Any],
        sync_token: Callable[[], str] | None = None,
    ) -> dict[str, Any]:
        """What an httpx client (async or sync) for ``tool`` is made with: the tool's URL,
        the signing auth, ``hook`` after the caller's own response hooks."""
        options = dict(kwargs)
        hooks = options.pop("event_hooks", {})
        if options.pop("follow_redirects", False):
            # httpx follows a redirect without signing again: the credential (and a proof)
            # would go wherever the answer points, outside the tool.
            raise TypeError("a tool's client never follows redirects (follow_redirects)")
        return {
            "follow_redirects": False,
            "base_url": self._tool_url(tool),
            "auth": TokenAuth(
                self._key,
                lambda: self.credential(*picked),
                sync_token=sync_token,
                within=self._tool_url(tool),
            ),
            "event_hooks": {**hooks, "response": [*hooks.get("response", ()), hook]},
            "timeout": options.pop("timeout", self._client.timeout),
            **options,
        }

    @contextlib.asynccontextmanager
    async def mcp(self, tool: str, tier: str | None = None) -> AsyncIterator[ClientSession]:
        """A connected, initialised session of the official MCP client SDK for ``tool``
        (its MCP endpoint through the gateway), authenticated the same way. A held call
        raises :class:`ApprovalRequired` (its ``resend`` calls the tool again with the
        same arguments); other gateway refusals raise their typed errors."""
        try:
            from mcp.client.streamable_http import (  # type: ignore[attr-defined]
                create_mcp_http_client,
                streamable_http_client,
            )
        except ImportError:
            raise TaskboundClientError(
                "mcp_unavailable", "MCP tools need the mcp package: pip install 'taskbound[mcp]'"
            ) from None
        picked = self._pick(tool, tier)
        refusals = _HttpRefusals()
        auth = httpx2_auth(
            self._key,
            lambda: self.credential(*picked),
            refusals.note,
            within=self._tool_url(tool),
        )
        session_class = _session_class(refusals)
        try:
            async with (
                create_mcp_http_client(auth=auth) as http,
                streamable_http_client(self._tool_url(tool), http_client=http) as streams,
                session_class(streams[0], streams[1]) as session,
            ):
                await session.initialize()
                yield session
        except BaseExceptionGroup as group:
            # The MCP client runs its transport in a task group, which wraps whatever
            # leaves the block; one error alone comes out as itself, so that
            # `except ApprovalRequired` (or any error of the block's own) around the block
            # works as it reads.
            sole = _sole(group)
            if sole is None:
                raise
            raise sole from None

    async def delegate(
        self,
        tool: str,
        tier: str | None = None,
        *,
        actions: Sequence[str] | None = None,
        constraints: Mapping[str, Any] | None = None,
    ) -> Delegation:
        """What a sub-agent needs to obtain a narrower credential of its own (RFC 8693):
        this credential and this holder's consent — a proof signed with its key for the
        token endpoint. Never the key itself. Hand the result (``to_json()``) over; the
        sub-agent calls :meth:`Client.accept` soon (the consent is short-lived)."""
        picked = self._pick(tool, tier)
        token = await self.credential(*picked)
        endpoint = await self._client.token_endpoint()
        chosen = tuple(actions) if actions is not None else None
        narrowed = dict(constraints) if constraints is not None else None
        # The consent names this narrowing exactly: the delegate cannot edit the hand-over
        # into a wider request (the broker refuses any other as invalid_grant).
        form = _narrowing_form(picked[0], picked[1], chosen, narrowed)
        digest = narrowing_digest(
            Narrowing(
                audiences=(form["audience"],),
                scope=form.get("scope"),
                authorization_details=form["authorization_details"],
            )
        )
        return Delegation(
            token_endpoint=endpoint,
            gateway_url=self._client.gateway_url,
            tool=picked[0],
            tier=picked[1],
            subject_token=token,
            subject_dpop=self._key.proof("POST", endpoint, access_token=token, narrowing=digest),
            actions=chosen,
            constraints=narrowed,
        )


class Task(_Holder):
    """A started task: its credentials, refreshed before they expire, and the tools they
    reach. Use through ``async with client.task(...)``; or end it yourself with
    :meth:`complete` / :meth:`cancel`."""

    def __init__(self, client: Client, key: DPoPKey, body: Mapping[str, Any]) -> None:
        super().__init__(client, key)
        self.id: str = str(body["id"])
        # The broker's answer for reading and logging: without the credentials' tokens.
        self.info: dict[str, Any] = {
            k: v if k != "credentials" else [_without_token(c) for c in v or ()]
            for k, v in body.items()
        }
        self.granted: list[dict[str, Any]] = list(body.get("granted") or ())
        self.denied: list[dict[str, Any]] = list(body.get("denied") or ())
        now = time.time()
        for c in body.get("credentials") or ():
            cred = Credential.from_answer(c, now)
            self._credentials[(cred.tool, cred.tier)] = cred
        self._refreshing: dict[tuple[str, str], asyncio.Lock] = {}
        self.ended = False

    def __repr__(self) -> str:  # never a token, never the key
        return f"Task(id={self.id!r}, held=[{self._held()}], ended={self.ended})"

    async def credential(self, tool: str, tier: str | None = None) -> str:
        picked = self._pick(tool, tier)
        cred = self._credentials[picked]
        if cred.fresh(time.time()):
            return cred.access_token
        lock = self._refreshing.setdefault(picked, asyncio.Lock())
        async with lock:
            cred = self._credentials[picked]
            if not cred.fresh(time.time()):
                cred = await self.refresh(*picked)
        return cred.access_token

    async def refresh(self, tool: str, tier: str) -> Credential:
        """A fresh credential for a granted (tool, tier), same key (``TaskEnded`` once the
        task is over)."""
        body = await self._client._agent_call(
            self._key, "POST", f"/v1/tasks/{self.id}/credentials", {"tool": tool, "tier": tier}
        )
        cred = Credential.from_answer(body, time.time())
        self._credentials[(cred.tool, cred.tier)] = cred
        return cred

    async def state(self) -> dict[str, Any]:
        """The task as the broker sees it now (``state``: active, completed, revoked…)."""
        return dict(await self._client._agent_call(self._key, "GET", f"/v1/tasks/{self.id}"))

    async def complete(self, reason: str = "") -> None:
        await self._end("complete", reason)

    async def cancel(self, reason: str = "") -> None:
        await self._end("cancel", reason)

    async def _end(self, verb: str, reason: str) -> None:
        body = {"reason": reason[:500]}
        await self._client._agent_call(self._key, "POST", f"/v1/tasks/{self.id}/{verb}", body)
        self.ended = True

    async def wait_for_approval(
        self, approval: ApprovalRequired | str, *, within: float = 300
    ) -> dict[str, Any]:
        """Wait (long polls, at most ``within`` seconds) until a person decides. Returns
        the approval once approved; raises :class:`ApprovalDenied` when it is denied or
        expires, ``TimeoutError`` when ``within`` passes first."""
        approval_id = approval.approval_id if isinstance(approval, ApprovalRequired) else approval
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"approval {approval_id} still pending after {within:g} s")
            # To the deadline, not past it: the server takes fractions of a second.
            wait = max(0.05, min(left, _APPROVAL_POLL_S))
            view = await self._client._agent_call(
                self._key, "GET", f"/v1/approvals/{quote(approval_id, safe='')}?wait={wait:.2f}"
            )
            state = str(view.get("state", ""))
            if state == "approved":
                return dict(view)
            if state in ("denied", "expired", "consumed"):
                raise ApprovalDenied(approval_id, state, view.get("reason"))

    async def retry_when_approved(self, held: ApprovalRequired, *, within: float = 300) -> Any:
        """Wait for the approval of a held call, then send exactly the same call again
        (same method, URL, body — or the same MCP tool and arguments) and return its
        answer. The approval is good for that one call only."""
        if held.resend is None:
            raise TaskboundClientError("not_resendable", "this refusal has no call to re-send")
        await self.wait_for_approval(held, within=within)
        return await held.resend()


class Delegated(_Holder):
    """A credential delegated to this agent by another (RFC 8693 token exchange): a
    strict narrowing of the parent's, bound to this agent's own key. It cannot be
    refreshed (ask the parent again); it dies with the parent's task."""

    def __init__(self, client: Client, key: DPoPKey, body: Mapping[str, Any]) -> None:
        super().__init__(client, key)
        details = (body.get("authorization_details") or [{}])[0]
        lifetime = float(body.get("expires_in", 0))
        cred = Credential(
            tool=str(details.get("tool", "")),
            tier=str(details.get("tier", "")),
            access_token=str(body["access_token"]),
            expires_at=time.time() + lifetime,
            actions=tuple(details.get("actions") or ()),
            lifetime=lifetime,
        )
        self.details: dict[str, Any] = dict(details)
        self._credentials[(cred.tool, cred.tier)] = cred

    def __repr__(self) -> str:  # never a token, never the key
        return f"Delegated(held=[{self._held()}], jkt={self.jkt!r})"


@dataclass(frozen=True)
class Delegation:
    """What a parent hands a sub-agent: its credential and its consent to the exchange,
    never its key. JSON-serialisable (``to_json`` / ``from_json``)."""

    token_endpoint: str
    gateway_url: str
    tool: str
    tier: str
    subject_token: str = field(repr=False)
    subject_dpop: str = field(repr=False)
    actions: tuple[str, ...] | None = None
    constraints: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["actions"] = list(self.actions) if self.actions is not None else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Delegation:
        """The delegation a parent handed over; ``ValueError`` when it is not one (not
        JSON, a member missing or of the wrong type)."""
        data = json.loads(text)  # JSONDecodeError is a ValueError
        if not isinstance(data, dict):
            raise ValueError("a delegation is a JSON object")
        strings = ("token_endpoint", "gateway_url", "tool", "tier", "subject_token", "subject_dpop")
        for name in strings:
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"a delegation needs {name!r} as a non-empty string")
        actions = data.get("actions")
        if actions is not None and (
            not isinstance(actions, list) or not all(isinstance(a, str) for a in actions)
        ):
            raise ValueError("a delegation's 'actions' is a list of action names or null")
        constraints = data.get("constraints")
        if constraints is not None and not isinstance(constraints, dict):
            raise ValueError("a delegation's 'constraints' is an object or null")
        return cls(
            **{name: data[name] for name in strings},
            actions=tuple(actions) if actions is not None else None,
            constraints=constraints,
        )


class Client:
    """One agent's connection to taskbound. ``identity`` is where its workload identity
    comes from (default: :func:`identity_from_env`); ``gateway_url`` where tools are
    reached (default: the broker's URL)."""

    def __init__(
        self,
        base_url: str,
        *,
        identity: IdentitySource | None = None,
        gateway_url: str | None = None,
        timeout: float = 30,
        dpop_alg: str = "Ed25519",
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.gateway_url = (gateway_url or base_url).rstrip("/")
        self.timeout = timeout
        self.dpop_alg = dpop_alg
        self._identity = identity
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._own_http = http is None
        self._metadata: dict[str, Any] | None = None
        # End calls still on their way after the code that made them was cancelled.
        self._ending: set[asyncio.Future[None]] = set()

    @property
    def identity(self) -> IdentitySource:
        if self._identity is None:
            self._identity = identity_from_env(self.base_url)
        return self._identity

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait (at most ``timeout``) for task end calls still on their way, then close
        the HTTP client this client made."""
        if self._ending:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(set(self._ending), timeout=self.timeout)
        if self._own_http:
            await self._http.aclose()

    async def token_endpoint(self) -> str:
        if self._metadata is None:
            r = await self._http.get(f"{self.base_url}/.well-known/oauth-authorization-server")
            self._metadata = await _answer(r, 200)
        return str((self._metadata or {}).get("token_endpoint") or f"{self.base_url}/oauth/token")

    async def _agent_call(
        self, key: DPoPKey, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> Any:
        """A broker call as the agent: identity token plus a proof by ``key``."""
        url = f"{self.base_url}{path}"
        identity = await self.identity.token()
        for _ in range(2):
            headers = {"Authorization": f"Bearer {identity}", "DPoP": key.proof(method, url)}
            r = await self._http.request(method, url, json=body, headers=headers)
            if not (key.learn_nonce(url, r.headers) and r.status_code in (400, 401)):
                break
        return await _answer(r, 200, 201)

    async def start_task(
        self,
        intent: str,
        *,
        on_behalf_of: str,
        scopes: Iterable[Scope],
        ttl_seconds: int = 600,
        constraints: Mapping[str, Any] | None = None,
        may_act: str | None = None,
    ) -> Task:
        """Start a task (prefer :meth:`task`, which also ends it). ``scopes`` are
        ``(tool, tier)`` pairs or ``{"tool", "tier", "actions"}`` mappings."""
        key = DPoPKey(self.dpop_alg)
        body: dict[str, Any] = {
            "intent": {"purpose": intent, "constraints": dict(constraints or {})},
            "on_behalf_of": on_behalf_of,
            "scopes": [_scope_body(s) for s in scopes],
            "ttl_seconds": ttl_seconds,
        }
        if may_act is not None:
            body["may_act"] = may_act
        answer = await self._agent_call(key, "POST", "/v1/tasks", body)
        task = Task(self, key, answer)
        log.info("task started", extra={"task_id": task.id, "granted": task.granted})
        return task

    @contextlib.asynccontextmanager
    async def task(
        self,
        intent: str,
        *,
        on_behalf_of: str,
        scopes: Iterable[Scope],
        ttl_seconds: int = 600,
        constraints: Mapping[str, Any] | None = None,
        may_act: str | None = None,
    ) -> AsyncIterator[Task]:
        """Start a task for the block and end it on the way out: completed when the block
        finishes, cancelled when it raises or is cancelled (its credentials are revoked
        everywhere either way)."""
        task = await self.start_task(
            intent,
            on_behalf_of=on_behalf_of,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            constraints=constraints,
            may_act=may_act,
        )
        try:
            yield task
        except BaseException as exc:
            await _end_quietly(task, "cancel", f"the agent's code stopped: {type(exc).__name__}")
            raise
        else:
            if not task.ended:
                await _end_quietly(task, "complete", "")

    async def accept(self, delegation: Delegation | str) -> Delegated:
        """The sub-agent's side of a delegation: exchange the parent's credential for one
        bound to a key of this agent's own, proving this agent's identity — at this
        client's own token endpoint only (a delegation naming another is refused:
        ``delegation_elsewhere``)."""
        if isinstance(delegation, str):
            delegation = Delegation.from_json(delegation)
        # The handoff is the other agent's word: this agent's identity token goes to its
        # own broker's token endpoint, never to a URL the handoff names.
        url = await self.token_endpoint()
        if delegation.token_endpoint != url:
            raise TaskboundClientError(
                "delegation_elsewhere",
                f"the delegation is for the token endpoint {delegation.token_endpoint!r}, "
                f"not this client's {url!r}",
            )
        key = DPoPKey(self.dpop_alg)
        form: dict[str, str] = {
            "grant_type": _TOKEN_EXCHANGE,
            "subject_token": delegation.subject_token,
            "subject_token_type": _ACCESS_TOKEN,
            "subject_dpop": delegation.subject_dpop,
            "actor_token": await self.identity.token(),
            "actor_token_type": _JWT,
            **_narrowing_form(
                delegation.tool, delegation.tier, delegation.actions, delegation.constraints
            ),
        }
        r = await self._http.post(url, data=form, headers={"DPoP": key.proof("POST", url)})
        body = await _answer(r, 200)
        return Delegated(self, key, body)


def _narrowing_form(
    tool: str,
    tier: str,
    actions: Sequence[str] | None,
    constraints: Mapping[str, Any] | None,
) -> dict[str, str]:
    """The narrowing parameters of a token exchange, always spelled the same way: the
    parent's consent binds their digest, and the delegate sends exactly these."""
    form = {"audience": tool}
    details: dict[str, Any] = {"type": "taskbound_tool", "tool": tool, "tier": tier}
    if actions is not None:
        # In authorization_details, where an empty list means "none" (refused) rather than
        # an empty scope's "as the parent".
        details["actions"] = list(actions)
        if actions:
            form["scope"] = " ".join(actions)
    if constraints is not None:
        details["constraints"] = dict(constraints)
    form["authorization_details"] = json.dumps(
        [details], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return form


async def _end_quietly(task: Task, verb: str, reason: str) -> None:
    """End the task, even while the surrounding code is being cancelled: the end call runs
    as a task of its own, shielded, so a further cancellation of this wait does not stop it
    (that cancellation is passed on, never swallowed; :meth:`Client.aclose` waits for end
    calls still on their way). A failure to end is logged, never raised over the block's
    own outcome."""
    ending = asyncio.ensure_future(_end_logged(task, verb, reason))
    pending = task._client._ending
    pending.add(ending)  # a strong reference while it runs
    ending.add_done_callback(pending.discard)
    # An anyio cancel scope (trio-style, level-triggered) cancels again and again: its
    # shield keeps this wait; asyncio.shield keeps the end call through a plain cancel,
    # which is passed on. The wait is bounded; the end call goes on regardless.
    with anyio.CancelScope(shield=True), anyio.move_on_after(task._client.timeout):
        await asyncio.shield(ending)


async def _end_logged(task: Task, verb: str, reason: str) -> None:
    try:
        await task._end(verb, reason)
    except TaskEnded:
        task.ended = True  # revoked or expired already: nothing left to end
    except Exception as exc:  # logged: this runs where nobody may be left to catch it
        log.warning(
            "the task could not be ended; its credentials still expire on their own",
            extra={"task_id": task.id, "error": f"{type(exc).__name__}: {exc}"},
        )


def might_be_refusal(response: httpx.Response) -> bool:
    return (
        response.status_code >= 400
        and REFUSAL_HEADER in response.headers
        and response.headers.get("content-type", "").startswith("application/problem+json")
    )


async def _refusal(response: httpx.Response) -> Mapping[str, Any] | None:
    """The body of a refusal by the gateway itself — marked as such, an RFC 9457 problem of
    taskbound's type — or None: a tool's own answers, errors included, pass as they are
    (a tool cannot imitate the mark: the gateway strips it from upstream answers)."""
    if not might_be_refusal(response):
        return None
    await response.aread()
    return refusal_body(response)


def refusal_body(response: httpx.Response) -> Mapping[str, Any] | None:
    """:func:`_refusal` on a response already read."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, Mapping) or not str(body.get("type", "")).startswith(PROBLEM_TYPE):
        return None
    return body


def _resender(
    client: httpx.AsyncClient, request: httpx.Request, reopen: Callable[[], httpx.AsyncClient]
) -> Any:
    """Re-send ``request`` as it was (new credential and proof added by the auth flow),
    through ``client``, or through a client like it (``reopen``) when the held call's own
    client was closed meanwhile — as it is when the refusal left its ``async with``."""
    method, url, content = request.method, request.url, request.content
    headers = {
        k: v for k, v in request.headers.items() if k.lower() not in ("authorization", "dpop")
    }

    def again() -> httpx.Request:
        # A request built as it was sent: no client defaults (params, headers, cookies)
        # merged into it again, so exactly the held call goes out.
        return httpx.Request(method, url, content=content, headers=headers)

    async def resend() -> httpx.Response:
        if not client.is_closed:
            return await client.send(again())
        async with reopen() as fresh:
            response = await fresh.send(again())
            await response.aread()
            return response

    return resend


class _HttpRefusals:
    """The gateway's refusals of an MCP session's HTTP requests themselves (a dead
    credential: 401; a stale revocation feed: 503), which the MCP client only reports as
    a generic JSON-RPC error. The latest is kept until a request succeeds."""

    def __init__(self) -> None:
        self._last: tuple[int, Mapping[str, Any]] | None = None
        # (serial, code) of JSON-RPC errors the gateway itself answered (marked), not yet
        # claimed; serials order them against the requests that wait for them.
        self._marked: list[tuple[int, str]] = []
        self._serial = 0

    def position(self) -> int:
        """Where the marks stand now: a request claims only marks made after it started."""
        return self._serial

    def claim(self, code: str, after: int) -> bool:
        """Whether a JSON-RPC error with this taskbound ``code``, answering a request that
        started at ``after``, came from the gateway (a tool's own error imitating one, or
        a mark left by another request before it, does not)."""
        for mark in self._marked:
            if mark[0] > after and mark[1] == code:
                self._marked.remove(mark)
                return True
        return False

    def last(self) -> TaskboundClientError | None:
        """The typed error for the latest refusal (a new one each time), if any."""
        return error_from(*self._last) if self._last is not None else None

    async def note(self, response: Any) -> None:
        marked = response.headers.get(REFUSAL_HEADER)
        if response.status_code < 400:
            self._last = None
            for code in (c.strip() for c in str(marked).split(",")):
                if code:
                    self._serial += 1
                    self._marked.append((self._serial, code))
            del self._marked[:-64]  # bounded: marks nobody claims are dropped
            return
        if not marked:
            return
        if not str(response.headers.get("content-type", "")).startswith("application/problem+json"):
            return
        await response.aread()
        try:
            body = response.json()
        except ValueError:
            return
        if isinstance(body, Mapping) and str(body.get("type", "")).startswith(PROBLEM_TYPE):
            self._last = (response.status_code, body)


def _sole(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The one error a (nested) exception group holds, or None when it holds several."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner if isinstance(inner, Exception) else None


def _session_class(refusals: _HttpRefusals) -> type[ClientSession]:
    """``mcp.ClientSession`` that raises taskbound's typed errors for the gateway's
    refusals: JSON-RPC errors carrying a taskbound ``code``, and refusals of the HTTP
    request itself; a held ``call_tool`` can be re-sent."""
    from mcp.client.session import ClientSession
    from mcp.shared.exceptions import MCPError

    class TaskboundSession(ClientSession):
        async def send_request(self, *a: Any, **kw: Any) -> Any:
            started = refusals.position()
            try:
                return await super().send_request(*a, **kw)
            except MCPError as exc:
                data = getattr(exc.error, "data", None)
                if (
                    isinstance(data, Mapping)
                    and isinstance(data.get("code"), str)
                    and refusals.claim(data["code"], started)
                ):
                    raise error_from(403, {"detail": exc.error.message, **data}) from exc
                refused = refusals.last()
                if refused is not None:
                    raise refused from exc
                raise

        async def call_tool(
            self, name: str, arguments: dict[str, Any] | None = None, *a: Any, **kw: Any
        ) -> Any:
            try:
                return await super().call_tool(name, arguments, *a, **kw)
            except ApprovalRequired as err:

                async def resend() -> Any:
                    return await self.call_tool(name, arguments, *a, **kw)

                err.resend = resend
                raise

    return TaskboundSession
