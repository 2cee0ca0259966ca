"""Shared Signals over HTTP: SETs pushed out to receivers, and SETs pushed in by transmitters.

The adapter half of :mod:`taskbound.core.signals` (docs/signals.md):

* :class:`SignalSender` follows the revocation log and pushes one signed SET per entry that
  has one (a revoked task is CAEP ``session-revoked``, a revoked credential CAEP
  ``credential-change``) to every configured receiver by RFC 8935 push. Delivery is
  at-least-once and in log order per receiver: the position of each receiver is a cursor in
  the database, moved by compare-and-set only after the receiver answered, so a restart
  resumes where it stopped and replicas sharing the database never skip an entry (a
  duplicate carries the same ``jti``, so the receiver can drop it).
* :class:`SignalReceiver` verifies a SET pushed to ``/v1/signals/{transmitter}`` against that
  transmitter's pinned issuer, audience, algorithms and key set, refuses replays, and
  suspends or quarantines each of our agents it names. Signals only ever take authority
  away: nothing received resumes an agent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import httpx

from taskbound.config import Settings, SignalReceiverConfig, SignalTransmitterConfig
from taskbound.core.clock import Clock
from taskbound.core.keys import KeyRing
from taskbound.core.model import AgentState, KeyPurpose, Revocation
from taskbound.core.signals import (
    MAX_SET_LENGTH,
    RISC_CREDENTIAL_COMPROMISE,
    AgentSignal,
    SecurityEvent,
    SignalRejected,
    agent_signals,
    revocation_set,
    verify_set,
)
from taskbound.errors import Conflict, NotFound
from taskbound.service.identity import unverified_kid
from taskbound.service.keys import KeyManager
from taskbound.service.registry import Registry
from taskbound.service.trust import JwksSource
from taskbound.storage.base import ReplayCache, Storage

__all__ = [
    "PUSH_DELIVERY_METHOD",
    "SET_MEDIA_TYPE",
    "DeliveryFailed",
    "SignalOutcome",
    "SignalReceiver",
    "SignalSender",
    "rejection_body",
    "signal_jti",
]

log = logging.getLogger("taskbound.signals")

#: RFC 8935 §2 / SSF §7.1: the delivery method URI of push delivery.
PUSH_DELIVERY_METHOD: Final = "urn:ietf:rfc:8935"
#: RFC 8417 §7.2: the media type of a SET, required on a push (RFC 8935 §2).
SET_MEDIA_TYPE: Final = "application/secevent+jwt"

_PAGE: Final = 100
_BACKOFF_MIN: Final = 0.5
# A receiver's answer is read up to this size: an error object is a few hundred bytes.
_MAX_RESPONSE: Final = 4096
_MAX_LOGGED_DESCRIPTION: Final = 200
_MAX_REASON: Final = 500
# Received SETs whose effect could not be applied (storage failing): a retransmission of the
# same jti is let through once more instead of being refused as a replay.
_MAX_UNAPPLIED: Final = 1000

_SUSPEND: Final = {"suspend": AgentState.SUSPENDED, "quarantine": AgentState.QUARANTINED}

# RFC 8935 §2.3: the failure response. The description is deliberately generic: the exact
# reason is for our log, not for whoever sent the request (DESIGN.md §7).
_DESCRIPTIONS: Final = {
    "invalid_request": "The request is not a Security Event Token this endpoint accepts.",
    "invalid_key": "The key or algorithm the SET is signed with is not acceptable.",
    "invalid_issuer": "The SET's issuer is not the one configured for this transmitter.",
    "invalid_audience": "The SET's audience does not name this receiver.",
    "authentication_failed": "The transmitter could not be authenticated.",
    "access_denied": "The transmitter may not send this SET.",
}


def rejection_body(err: str) -> dict[str, str]:
    """The RFC 8935 §2.3 failure response body for the §2.4 error code ``err``."""
    return {"err": err, "description": _DESCRIPTIONS.get(err, "The SET was refused.")}


def signal_jti(issuer: str, receiver: str, seq: int) -> str:
    """The ``jti`` of the SET for revocation ``seq`` sent to ``receiver``: the same on every
    attempt and from every replica, so that a receiver recognises a duplicate (RFC 8417
    §2.2), and different for each (issuer, receiver, entry)."""
    digest = hashlib.sha256(f"{issuer}\n{receiver}\n{seq}".encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# --- out ---------------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """A push that may succeed later (no connection, timeout, 5xx, 401, 429…): retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body[:limit])


def _failure(body: bytes) -> tuple[str, str]:
    """``err`` and ``description`` of an RFC 8935 §2.3 failure response, as far as they
    can be read (a proxy's 400 page has neither)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "unreadable", ""
    if not isinstance(data, dict):
        return "unreadable", ""
    err, description = data.get("err"), data.get("description")
    return (
        err[:64] if isinstance(err, str) and err else "unreadable",
        description[:_MAX_LOGGED_DESCRIPTION] if isinstance(description, str) else "",
    )


class SignalSender:
    """Pushes a SET for every revocation-log entry to each configured receiver (RFC 8935).

    One loop per receiver, so a receiver that is down delays only its own stream. Each loop
    reads the log after the receiver's cursor, pushes the entries in order and moves the
    cursor by compare-and-set after each answer: ``2xx`` is delivered, ``400`` is a
    permanent refusal (logged with the receiver's ``err``, then skipped), anything else is
    retried with capped exponential backoff without moving on. It wakes when the
    revocation feed applies entries (:meth:`notify`) and every ``poll_interval_seconds``.
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        keys: KeyManager,
        clock: Clock,
        http: httpx.AsyncClient,
    ) -> None:
        cfg = settings.signals
        self.receivers: tuple[SignalReceiverConfig, ...] = cfg.receivers
        self._issuer = settings.issuer
        self._storage = storage
        self._keys = keys
        self._clock = clock
        self._http = http
        self._timeout = cfg.timeout_seconds
        self._poll = cfg.poll_interval_seconds
        self._retry_max = cfg.retry_max_seconds
        self._wake = {r.name: asyncio.Event() for r in self.receivers}
        self._tasks: list[asyncio.Task[None]] = []
        self.delivered = 0  # SETs a receiver accepted (for /metrics)
        self.rejected = 0  # SETs a receiver refused for good
        self.failures = 0  # attempts that will be retried

    def notify(self, entries: Sequence[Revocation] = ()) -> None:
        """Wake every receiver's loop (a :class:`RevocationFeed` listener)."""
        for event in self._wake.values():
            event.set()

    # --- one receiver ----------------------------------------------------------------------

    async def cursor(self, receiver: SignalReceiverConfig) -> int:
        """The receiver's cursor, created at first use: at the end of the log now, so that
        history is not replayed, or at its start with ``from_start``."""
        current = await self._storage.get_signal_cursor(receiver.name)
        if current is not None:
            return current
        start = 0 if receiver.from_start else await self._storage.last_revocation_seq()
        if await self._storage.set_signal_cursor(
            receiver.name, start, self._clock.now(), expected=None
        ):
            log.info(
                "signal cursor created",
                extra={"event": "signal.cursor_created", "receiver": receiver.name, "seq": start},
            )
            return start
        # Another replica created it first: use theirs.
        current = await self._storage.get_signal_cursor(receiver.name)
        if current is None:
            raise DeliveryFailed("signal cursor could not be created")
        return current

    async def _advance(self, receiver: str, expected: int, seq: int) -> int:
        """Move the cursor from ``expected`` to ``seq``; the cursor as it now stands (a
        replica that moved it first wins, and this one continues from there)."""
        if await self._storage.set_signal_cursor(
            receiver, seq, self._clock.now(), expected=expected
        ):
            return seq
        current = await self._storage.get_signal_cursor(receiver)
        log.debug(
            "signal cursor moved by another replica",
            extra={"receiver": receiver, "expected": expected, "found": current},
        )
        return seq if current is None else current

    def _set_for(self, receiver: SignalReceiverConfig, entry: Revocation) -> str | None:
        try:
            return revocation_set(
                entry,
                issuer=self._issuer,
                audience=receiver.audience,
                jti=signal_jti(self._issuer, receiver.name, entry.seq),
                now=self._clock.now(),
                key=self._keys.signer(KeyPurpose.SIGNALS),
            )
        except ValueError as exc:
            # Can never be sent (e.g. a subject kilobytes long): say so and move on rather
            # than block every later signal behind it.
            log.error(
                "revocation cannot be signalled; skipped",
                extra={
                    "event": "signal.unsendable",
                    "receiver": receiver.name,
                    "seq": entry.seq,
                    "reason": str(exc),
                },
            )
            return None

    async def deliver_pending(self, receiver: SignalReceiverConfig) -> int:
        """Push every entry after the receiver's cursor, in order, until caught up.

        Returns how many SETs the receiver answered (accepted or refused for good); raises
        :class:`DeliveryFailed` at the first push to retry, the cursor left before it.
        """
        cursor = await self.cursor(receiver)
        answered = 0
        while True:
            page = await self._storage.list_revocations(after=cursor, limit=_PAGE)
            if not page:
                return answered
            position = cursor
            raced = False
            for entry in page:
                token = self._set_for(receiver, entry)
                position = entry.seq
                if token is None:
                    continue  # no signal for this kind; persisted with the next move
                await self._push(receiver, entry, token)
                answered += 1
                moved = await self._advance(receiver.name, cursor, position)
                raced = moved != position
                cursor = moved
                if raced:
                    break
            if raced:
                continue
            if position != cursor:
                cursor = await self._advance(receiver.name, cursor, position)
            if len(page) < _PAGE:
                return answered

    async def _push(self, receiver: SignalReceiverConfig, entry: Revocation, token: str) -> None:
        """RFC 8935 §2: POST the SET; return when the receiver has answered for good."""
        headers = {"Content-Type": SET_MEDIA_TYPE, "Accept": "application/json"}
        if receiver.authorization is not None:
            headers["Authorization"] = receiver.authorization.get_secret_value()
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http.stream(
                    "POST",
                    receiver.endpoint,
                    content=token.encode("ascii"),
                    headers=headers,
                    timeout=self._timeout,
                    follow_redirects=False,
                ) as response:
                    body = await _read_capped(response, _MAX_RESPONSE)
        except TimeoutError:
            raise DeliveryFailed("timed out") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(type(exc).__name__) from None
        status = response.status_code
        where = {"receiver": receiver.name, "seq": entry.seq, "kind": entry.kind.value}
        if 200 <= status < 300:
            # RFC 8935 §2.2 says 202; any success status means the receiver has it.
            self.delivered += 1
            log.info("signal delivered", extra={"event": "signal.delivered", **where})
            return
        if status == 400:
            # RFC 8935 §2.3: the receiver refused this SET. Sending it again would be
            # refused again, so it is logged and the stream moves on.
            err, description = _failure(body)
            self.rejected += 1
            log.warning(
                "signal refused by the receiver; skipped",
                extra={
                    "event": "signal.refused",
                    "err": err,
                    "description": description,
                    **where,
                },
            )
            return
        raise DeliveryFailed(f"HTTP {status}")

    async def _follow(self, receiver: SignalReceiverConfig) -> None:
        wake = self._wake[receiver.name]
        first = min(_BACKOFF_MIN, self._retry_max)
        backoff = first
        while True:
            wake.clear()
            try:
                await self.deliver_pending(receiver)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                reason = exc.reason if isinstance(exc, DeliveryFailed) else type(exc).__name__
                log.warning(
                    "signal delivery failed; retrying",
                    extra={
                        "event": "signal.retry",
                        "receiver": receiver.name,
                        "error": reason,
                        "retry_in": backoff,
                    },
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max)
                continue
            backoff = first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self._poll)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start one delivery loop per receiver (in the running event loop)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(r)) for r in self.receivers]

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- in ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalOutcome:
    """What one event of a received SET did to the agent it names.

    ``state`` is the state the agent is in afterwards (``None`` for an unknown agent);
    ``changed`` whether this signal changed it; ``note`` why not, when it did not.
    """

    agent: str
    event_type: str
    state: AgentState | None
    changed: bool
    note: str = ""


@dataclass(frozen=True, slots=True)
class _Transmitter:
    config: SignalTransmitterConfig
    keys: JwksSource
    audience: str
    accepted: frozenset[str]


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _clean_reason(reason: str, fallback: str) -> str:
    """The transmitter's reason as stored text: printable characters only, bounded."""
    cleaned = "".join(ch for ch in reason if ch.isprintable()).strip()[:_MAX_REASON]
    return cleaned or fallback


class SignalReceiver:
    """Verifies SETs pushed by the configured transmitters and applies what they say.

    For each SET: the transmitter's HTTP authorization when configured, the media type and
    size (RFC 8935 §2), then :func:`~taskbound.core.signals.verify_set` against that
    transmitter's issuer, audience, algorithms and key set (re-read once, rate-limited, when
    the SET names an unknown ``kid``), then the ``jti`` against replays for as long as the
    SET could be accepted. Every refusal raises :class:`SignalRejected` and is logged at
    warning with the transmitter and ``err``, never with the token.
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        registry: Registry,
        replay: ReplayCache,
        clock: Clock,
        http: httpx.AsyncClient,
        *,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        cfg = settings.signals
        self._storage = storage
        self._registry = registry
        self._replay = replay
        self._clock = clock
        self._on_change = on_change
        self._max_age = timedelta(seconds=cfg.max_age_seconds)
        self._leeway = timedelta(seconds=settings.credentials.clock_leeway_seconds)
        refresh = timedelta(seconds=cfg.jwks_refresh_seconds)
        min_refresh = timedelta(seconds=cfg.jwks_min_refresh_seconds)
        self._transmitters: dict[str, _Transmitter] = {}
        for t in cfg.transmitters:
            if t.jwks_file is not None:
                source = JwksSource.from_file(t.jwks_file, min_refresh=min_refresh, max_age=refresh)
            else:
                assert t.jwks_url is not None
                source = JwksSource.from_url(
                    t.jwks_url, http=http, min_refresh=min_refresh, max_age=refresh
                )
            self._transmitters[t.name] = _Transmitter(
                config=t,
                keys=source,
                audience=t.audience or settings.issuer,
                accepted=frozenset(t.accepted_events),
            )
        self._unapplied: dict[str, datetime] = {}
        self.accepted = 0  # SETs accepted (for /metrics)
        self.refused = 0  # SETs refused

    def knows(self, transmitter: str) -> bool:
        return transmitter in self._transmitters

    async def receive(
        self,
        transmitter: str,
        body: bytes,
        *,
        content_type: str | None,
        authorization: str | None = None,
    ) -> list[SignalOutcome]:
        """Verify one pushed SET from ``transmitter`` and apply it.

        Raises :class:`~taskbound.errors.NotFound` for an unknown transmitter,
        :class:`SignalRejected` for a SET refused (RFC 8935 §2.3, answered 400 with its
        ``err``), :class:`~taskbound.errors.IdentityProviderUnavailable` when the
        transmitter's keys cannot be read (answered 503: the transmitter retries).
        """
        t = self._transmitters.get(transmitter)
        if t is None:
            raise NotFound("no such transmitter")
        try:
            event = await self._verify(t, body, content_type, authorization)
        except SignalRejected as exc:
            self.refused += 1
            log.warning(
                "signal refused",
                extra={
                    "event": "signal.in_refused",
                    "transmitter": transmitter,
                    "err": exc.err,
                    "reason": exc.reason,
                },
            )
            raise
        replay_key = f"ssf:{transmitter}:{hashlib.sha256(event.jti.encode()).hexdigest()}"
        outcomes = await self._apply_once(t, event, replay_key)
        self.accepted += 1
        log.info(
            "signal accepted",
            extra={
                "event": "signal.in_accepted",
                "transmitter": transmitter,
                "jti": event.jti[:128],
                "events": sorted(event.events)[:8],
                "agents_changed": sum(o.changed for o in outcomes),
            },
        )
        return outcomes

    async def _verify(
        self,
        t: _Transmitter,
        body: bytes,
        content_type: str | None,
        authorization: str | None,
    ) -> SecurityEvent:
        expected = t.config.authorization
        if expected is not None and not hmac.compare_digest(
            (authorization or "").encode(), expected.get_secret_value().encode()
        ):
            raise SignalRejected("authentication_failed", "Authorization header missing or wrong")
        media = _media_type(content_type)
        if media != SET_MEDIA_TYPE:
            raise SignalRejected("invalid_request", f"content type {media[:64]!r}")
        if len(body) > MAX_SET_LENGTH:
            raise SignalRejected("invalid_request", f"body longer than {MAX_SET_LENGTH} bytes")
        try:
            token = body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SignalRejected("invalid_request", "body is not ASCII") from None
        now = self._clock.now()
        ring = await t.keys.keyring(now=now)
        try:
            return self._verify_with(t, token, ring, now)
        except SignalRejected as exc:
            if exc.err != "invalid_key":
                raise
            # Perhaps the transmitter rotated: re-read its keys, at most once per
            # jwks_min_refresh_seconds, and only for a kid we do not hold.
            kid = unverified_kid(token)
            if kid is None or kid in ring.kids():
                raise
            if not await t.keys.refresh_for_unknown_kid(now=now):
                raise
            return self._verify_with(t, token, await t.keys.keyring(now=now), now)

    def _verify_with(
        self, t: _Transmitter, token: str, ring: KeyRing, now: datetime
    ) -> SecurityEvent:
        return verify_set(
            token,
            keys=ring,
            issuer=t.config.issuer,
            audience=t.audience,
            algorithms=t.config.algorithms,
            now=now,
            max_age=self._max_age,
            leeway=self._leeway,
        )

    async def _apply_once(
        self, t: _Transmitter, event: SecurityEvent, replay_key: str
    ) -> list[SignalOutcome]:
        now = self._clock.now()
        # Remembered for as long as verify_set would still accept this SET, plus a second
        # so that the record never expires at the very instant of acceptance.
        until = event.issued_at + self._max_age + self._leeway + timedelta(seconds=1)
        retrying = self._unapplied.pop(replay_key, None) is not None
        if await self._replay.seen(replay_key, until, now) and not retrying:
            self.refused += 1
            log.warning(
                "signal refused",
                extra={
                    "event": "signal.in_refused",
                    "transmitter": t.config.name,
                    "err": "invalid_request",
                    "reason": "jti already received (replay)",
                },
            )
            raise SignalRejected("invalid_request", "jti already received")
        try:
            outcomes = [await self._apply(t, signal) for signal in agent_signals(event, t.accepted)]
        except BaseException:
            # The jti is recorded but its effect is not: let the transmitter's retry in.
            self._remember_unapplied(replay_key, until)
            raise
        if self._on_change is not None and any(o.changed for o in outcomes):
            await self._on_change()
        return outcomes

    def _remember_unapplied(self, key: str, until: datetime) -> None:
        now = self._clock.now()
        for old in [k for k, expiry in self._unapplied.items() if expiry <= now]:
            del self._unapplied[old]
        if len(self._unapplied) < _MAX_UNAPPLIED:
            self._unapplied[key] = until

    async def _apply(self, t: _Transmitter, signal: AgentSignal) -> SignalOutcome:
        name = t.config.name
        action = (
            t.config.compromise_action
            if signal.event_type == RISC_CREDENTIAL_COMPROMISE
            else t.config.action
        )
        target = _SUSPEND[action]
        where: dict[str, Any] = {
            "transmitter": name,
            "agent": signal.spiffe_id,
            "event_type": signal.event_type,
        }
        agent = await self._storage.get_agent(signal.spiffe_id)
        if agent is None:
            # Streams carry events about principals that are not ours: not an error.
            log.info("signal names no registered agent; ignored", extra=where)
            return SignalOutcome(signal.spiffe_id, signal.event_type, None, False, "unknown agent")
        if agent.state is AgentState.RETIRED or (
            agent.state is AgentState.QUARANTINED and target is AgentState.SUSPENDED
        ):
            # Never weaken: a quarantined agent stays quarantined, a retired one retired.
            return SignalOutcome(
                signal.spiffe_id, signal.event_type, agent.state, False, f"already {agent.state}"
            )
        try:
            updated, changed = await self._registry.set_agent_state(
                signal.spiffe_id,
                target,
                cause=f"signal:{name}",
                reason=_clean_reason(signal.reason, signal.event_type.rsplit("/", 1)[-1]),
            )
        except (NotFound, Conflict) as exc:
            # Deleted or retired between the read and the change.
            log.info("signal not applied", extra={**where, "reason": exc.code})
            return SignalOutcome(signal.spiffe_id, signal.event_type, None, False, exc.code)
        log.warning(
            "agent state changed by a received signal",
            extra={"event": "signal.applied", "state": updated.state.value, **where},
        )
        return SignalOutcome(signal.spiffe_id, signal.event_type, updated.state, changed)
