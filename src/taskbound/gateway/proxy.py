"""Forwarding to the upstream tool: the agent's credential out, the tool's secret in,
streaming both ways with bounded timeouts, hop-by-hop headers dropped (RFC 9110 §7.6.1).

aiohttp is the upstream client: as a proxy's client it costs several times less CPU per
request than httpx (measured on this kind of machine while planning).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the agent's credential and proof, what the client library sets
# for this hop, and headers that ask a server to act on another method or path than the one
# the gateway decided on.
STRIPPED_UPSTREAM = HOP_BY_HOP | {
    "authorization",
    "dpop",
    "host",
    "content-length",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "x-forwarded-port",
}
# The gateway's mark on its own refusals (its value: the refusal's code), so that a client
# can tell them from a tool's own errors; never passed on from an upstream.
REFUSAL_HEADER = "Taskbound-Refusal"
# Dropped from the upstream's answer: this hop's own (the server sets its Date), and any
# imitation of the gateway's refusal mark.
STRIPPED_DOWNSTREAM = HOP_BY_HOP | {
    "date",
    "server",
    "location",
    REFUSAL_HEADER.lower(),
    # DPoP nonces are the gateway's own to give (RFC 9449 §8), never a tool's.
    "dpop-nonce",
}


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {
        t.strip().lower()
        for k, v in headers
        if k.lower() == "connection"
        for t in v.split(",")
        if t.strip()
    }


def upstream_headers(
    incoming: list[tuple[str, str]],
    secret_header: str,
    secret: str | None,
    drop: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """The request headers for the upstream: the agent's credential and proof removed,
    hop-by-hop and override headers removed, and the tool's secret as the only value of
    its header."""
    named = _connection_tokens(incoming)
    out = [
        (k, v)
        for k, v in incoming
        if k.lower() not in STRIPPED_UPSTREAM
        and k.lower() not in named
        and k.lower() not in drop
        and k.lower() != secret_header.lower()
    ]
    if secret is not None:
        out.append((secret_header, secret))
    return out


def downstream_headers(
    upstream: Mapping[str, str],
    *,
    drop_length: bool,
    secret: str | None,
    location: str | None,
) -> list[tuple[str, str]]:
    """The response headers for the agent, as a list (repeated headers kept): hop-by-hop
    removed, never a header that carries the tool's secret, and a Location only as the
    gateway URL the caller worked out."""
    items = list(upstream.items())
    named = _connection_tokens(items)
    out = [
        (k, v)
        for k, v in items
        if k.lower() not in STRIPPED_DOWNSTREAM
        and k.lower() not in named
        and not (drop_length and k.lower() == "content-length")
        and not (secret and secret in v)
    ]
    if location is not None:
        out.append(("location", location))
    return out


class Upstream:
    """One aiohttp session per process, created in the running event loop."""

    def __init__(
        self, *, connect_timeout: float, total_timeout: float, max_connections: int
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout, connect=connect_timeout, sock_read=total_timeout
        )
        self._max = max_connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max, ttl_dns_cache=60),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> aiohttp.ClientResponse:
        return await self.session().request(
            method, url, headers=headers, data=body or None, allow_redirects=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def relay(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream body, chunk by chunk; the connection is released however it ends."""
    try:
        async for chunk in response.content.iter_chunked(64 * 1024):
            yield chunk
    finally:
        response.release()


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Server-sent events (one complete event text per item, without its blank line)."""
    buffer = ""
    try:
        async for chunk in response.content.iter_any():
            buffer += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                yield event
        if buffer.strip():
            yield buffer
    finally:
        response.release()


def transform_sse_event(event: str, fn: Callable[[Any], Any]) -> str:
    """Apply ``fn`` to the JSON carried by an SSE event's data lines."""
    lines = event.split("\n")
    data = [line[5:].lstrip(" ") for line in lines if line.startswith("data:")]
    if not data:
        return event
    try:
        message = json.loads("\n".join(data))
    except ValueError:
        return event
    others = [line for line in lines if not line.startswith("data:")]
    return "\n".join([*others, "data: " + json.dumps(fn(message), separators=(",", ":"))])
