"""Per-task upstream credentials: for a tool with an ``upstream_exchange``, the gateway asks
the upstream's own authorization server for a token by OAuth 2.0 Token Exchange (RFC 8693
§2.1), presenting a Txn-Token (draft-ietf-oauth-transaction-tokens) that names the task's
agent and transaction as the subject token, and authenticating with its client id and
secret (``client_secret_basic``, RFC 6749 §2.3.1).

The token it gets is kept per (tool and exchange settings, task, holding agent, tier) until
shortly before it expires, in a bounded cache that forgets a task's tokens as soon as the
task, its agent or its owner loses standing. Concurrent calls that miss share one request.
Any failure is a :class:`CredentialUnavailable`: the gateway then refuses the call rather
than forward it without a credential.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import quote_plus

import httpx

from taskbound.core.clock import Clock
from taskbound.core.model import UpstreamExchange
from taskbound.core.txn import TXN_TOKEN_TYPE

TOKEN_EXCHANGE_GRANT: Final = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN, not a secret
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN, not a secret
# RFC 8693 §3: what an exchange may answer that is still an access token to present.
_ISSUED_TYPES: Final = frozenset({ACCESS_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:jwt"})
MAX_RESPONSE_BYTES: Final = 64 * 1024
MAX_TOKEN_LENGTH: Final = 8192
# A token is reused until this long before it expires (at most half its lifetime).
MARGIN: Final = timedelta(seconds=30)
# Visible ASCII only: the token goes into an HTTP header as it is.
_HEADER_SAFE: Final = re.compile(r"^[\x21-\x7e]+$")
_ERROR_CODE: Final = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")


class CredentialUnavailable(Exception):
    """No upstream credential could be obtained; ``reason`` says why (never a secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What one upstream token is for. The exchange settings are part of it, so a tool
    reconfigured in another process is never answered with a token from the old ones."""

    tool: str
    exchange: UpstreamExchange
    task: str
    holder: str  # the agent holding the credential (the current actor of a delegation)
    tier: str


@dataclass(frozen=True, slots=True)
class _Entry:
    token: str
    until: datetime
    agent: str  # the task's agent
    owner: str


class UpstreamTokens:
    def __init__(
        self,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        timeout: httpx.Timeout,
        max_entries: int = 10_000,
    ) -> None:
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._max = max_entries
        self._entries: OrderedDict[TokenKey, _Entry] = OrderedDict()
        self._inflight: dict[TokenKey, asyncio.Task[str]] = {}
        # Bumped by every eviction: a fetch that started before one is used, not kept.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(
        self,
        key: TokenKey,
        *,
        agent: str,
        owner: str,
        subject_token: Callable[[], str],
        client_secret: Callable[[], Awaitable[str | None]],
    ) -> str:
        """The upstream token for ``key``: cached, or obtained now. ``subject_token`` and
        ``client_secret`` are only called when a request is made."""
        now = self._clock.now()
        entry = self._entries.get(key)
        if entry is not None:
            if now < entry.until:
                self._entries.move_to_end(key)
                return entry.token
            del self._entries[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch(key, agent, owner, subject_token, client_secret)
            )
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        # Shielded: one caller giving up does not cancel the request the others wait for.
        return await asyncio.shield(task)

    def _settled(self, key: TokenKey, done: asyncio.Task[str]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            # Retrieved here, so a failure whose only caller gave up is not reported as
            # "never retrieved"; the callers still awaiting it get it as well.
            done.exception()

    def evict(
        self,
        *,
        task: str | None = None,
        agent: str | None = None,
        owner: str | None = None,
        tool: str | None = None,
    ) -> int:
        """Forget the tokens of a task, of an agent (as the task's agent or as holder), of
        an owner or of a tool. Returns how many were dropped."""
        self._generation += 1
        doomed = [
            k
            for k, e in self._entries.items()
            if k.task == task
            or (agent is not None and agent in (e.agent, k.holder))
            or e.owner == owner
            or k.tool == tool
        ]
        for k in doomed:
            del self._entries[k]
        return len(doomed)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    async def _fetch(
        self,
        key: TokenKey,
        agent: str,
        owner: str,
        subject_token: Callable[[], str],
        client_secret: Callable[[], Awaitable[str | None]],
    ) -> str:
        generation = self._generation
        try:
            secret = await client_secret()
        except Exception as exc:
            raise CredentialUnavailable(
                f"the client secret cannot be read: {type(exc).__name__}"
            ) from None
        if secret is None:
            raise CredentialUnavailable("no client secret is stored for the exchange")
        token, lifetime = await self._exchange(key.exchange, subject_token(), secret)
        now = self._clock.now()
        until = now + lifetime - min(MARGIN, lifetime / 2)
        if generation == self._generation and until > now and self._max > 0:
            self._entries[key] = _Entry(token, until, agent, owner)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return token

    async def _exchange(
        self, exchange: UpstreamExchange, subject_token: str, secret: str
    ) -> tuple[str, timedelta]:
        """One RFC 8693 §2.1 request; the answer checked per §2.2.1 and RFC 6749 §5.1."""
        form = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": subject_token,
            "subject_token_type": TXN_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "audience": exchange.audience,
        }
        if exchange.scope is not None:
            form["scope"] = exchange.scope
        # RFC 6749 §2.3.1: both halves form-encoded before the Basic encoding.
        basic = f"{quote_plus(exchange.client_id)}:{quote_plus(secret)}"
        headers = {
            "Authorization": "Basic " + base64.b64encode(basic.encode()).decode("ascii"),
            "Accept": "application/json",
        }
        try:
            async with self._http.stream(
                "POST",
                exchange.token_endpoint,
                data=form,
                headers=headers,
                timeout=self._timeout,
                follow_redirects=False,
            ) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise CredentialUnavailable(
                            f"the token endpoint answered more than {MAX_RESPONSE_BYTES} bytes"
                        )
                status = response.status_code
        except httpx.HTTPError as exc:
            raise CredentialUnavailable(
                f"the token endpoint cannot be reached: {type(exc).__name__}"
            ) from None
        data = _json_object(bytes(body))
        if status != 200:
            error = data.get("error") if data is not None else None
            code = error if isinstance(error, str) and _ERROR_CODE.match(error) else "-"
            raise CredentialUnavailable(f"the token endpoint refused: HTTP {status}, {code}")
        if data is None:
            raise CredentialUnavailable("the token endpoint's answer is not a JSON object")
        return _token(data)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _token(data: dict[str, Any]) -> tuple[str, timedelta]:
    token = data.get("access_token")
    if (
        not isinstance(token, str)
        or not 1 <= len(token) <= MAX_TOKEN_LENGTH
        or not _HEADER_SAFE.match(token)
    ):
        raise CredentialUnavailable("the token endpoint's access_token is missing or unusable")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        # A DPoP- or N_A-typed token is not one the gateway can present on its own.
        raise CredentialUnavailable(f"the token endpoint issued a {str(token_type)[:40]!r} token")
    issued = data.get("issued_token_type")
    if issued is not None and issued not in _ISSUED_TYPES:
        raise CredentialUnavailable(
            f"the token endpoint issued a {str(issued)[:80]!r}, not an access token"
        )
    expires_in = data.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise CredentialUnavailable("the token endpoint's answer has no positive expires_in")
    return token, timedelta(seconds=min(expires_in, 24 * 3600))
