"""Wiring: build every service of one taskbound process from its settings."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import httpx

from taskbound.config import Settings
from taskbound.core.clock import Clock, SystemClock
from taskbound.core.grant import GrantDecider
from taskbound.core.model import KeyPurpose
from taskbound.core.secretbox import SecretBox
from taskbound.service.approvals import Approvals
from taskbound.service.audit_chain import AuditChain
from taskbound.service.breakglass import BreakGlassService
from taskbound.service.broker import Broker
from taskbound.service.events import Events
from taskbound.service.identity import IdentityVerifier
from taskbound.service.kek import load_kek
from taskbound.service.keys import KeyManager
from taskbound.service.policy import PolicyEngine
from taskbound.service.registry import Registry
from taskbound.service.reports import ReportService
from taskbound.service.revocations import RevocationFeed
from taskbound.service.signals import SignalReceiver, SignalSender
from taskbound.storage import open_storage
from taskbound.storage.base import ReplayCache, Storage
from taskbound.storage.redis_replay import RedisReplayCache
from taskbound.storage.replay import MemoryReplayCache

log = logging.getLogger("taskbound.runtime")


@dataclass
class Services:
    settings: Settings
    clock: Clock
    storage: Storage
    box: SecretBox
    keys: KeyManager
    identity: IdentityVerifier
    registry: Registry
    broker: Broker
    policy: PolicyEngine
    events: Events
    replay: ReplayCache
    http: httpx.AsyncClient
    revocations: RevocationFeed
    # Human approvals of held calls (and their webhook notifications).
    approvals: Approvals
    # Break-glass exceptions: grant, early end, review.
    breakglass: BreakGlassService
    # The audit chain's checkpoints, verification and export.
    audit: AuditChain
    # Posture reports: usage, findings, blast radius, framework alignment.
    reports: ReportService
    # Resources other components opened on these services (the gateway's upstream pool).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Shared Signals: out (None without receivers; started by the app), in (None without
    # transmitters).
    signal_sender: SignalSender | None = None
    signal_receiver: SignalReceiver | None = None

    async def aclose(self) -> None:
        for close_one in reversed(self.closers):
            await close_one()
        if self.signal_sender is not None:
            await self.signal_sender.aclose()
        await self.revocations.aclose()
        await self.approvals.aclose()
        await self.http.aclose()
        close = getattr(self.replay, "close", None)
        if close is not None:
            await close()
        await self.storage.close()


async def open_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    storage: Storage | None = None,
    box: SecretBox | None = None,
    decider: GrantDecider | None = None,
) -> Services:
    """Open storage (migrating it), load or create keys, and build the services."""
    clock = clock or SystemClock()
    box = box or load_kek(settings)
    storage = storage or await open_storage(settings.storage_url)
    try:
        creds = settings.credentials
        # A retiring key stays published as long as anything it signed can still be valid.
        overlap = timedelta(seconds=creds.max_ttl_seconds + creds.clock_leeway_seconds)
        keys = KeyManager(storage, box, clock, algorithm=settings.keys.algorithm, overlap=overlap)
        purposes: tuple[KeyPurpose, ...] = (KeyPurpose.CREDENTIALS, KeyPurpose.AUDIT)
        if settings.identity.dev_issuer:
            purposes += (KeyPurpose.DEV_IDENTITY,)
        if settings.signals.receivers:
            purposes += (KeyPurpose.SIGNALS,)
        if settings.gateway.enabled:
            # Txn-Tokens the gateway sends with each forwarded call (docs/gateway.md).
            purposes += (KeyPurpose.TRANSACTION,)
        await keys.ensure(purposes)
        http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), follow_redirects=False)
        identity = IdentityVerifier(settings, keys, clock, http)
        replay: ReplayCache
        if settings.dpop.replay_cache == "redis":
            assert settings.dpop.redis_url is not None
            replay = RedisReplayCache(settings.dpop.redis_url.get_secret_value())
        else:
            replay = MemoryReplayCache(max_entries=settings.dpop.replay_cache_max_entries)
        policy = PolicyEngine(settings, storage, clock)
        await policy.load()
        events = Events()
        broker = Broker(
            settings,
            storage,
            keys,
            identity,
            decider or policy.grant_decider(),
            replay,
            clock,
            events=events,
        )
        registry = Registry(
            storage, box, clock, on_tools_changed=policy.refresh_registry, events=events
        )
        # Before serving: every revocation that still matters is in memory.
        revocations = RevocationFeed(settings, storage, clock)
        revocations.listeners.append(keys.on_revocations)
        await revocations.load()
        signal_sender = None
        if settings.signals.receivers:
            signal_sender = SignalSender(settings, storage, keys, clock, http)
            revocations.listeners.append(signal_sender.notify)
        approvals = Approvals(settings, storage, clock, http)
        exceptions = BreakGlassService(
            settings.breakglass, storage, clock, after_revocation=revocations.sync
        )
        chain = AuditChain(settings, storage, keys, clock, http)
        reports = ReportService(settings, storage, clock, policy, chain)
        signal_receiver = None
        if settings.signals.transmitters:
            signal_receiver = SignalReceiver(
                settings, storage, registry, replay, clock, http, on_change=revocations.sync
            )
    except BaseException:
        await storage.close()
        raise
    if settings.identity.dev_issuer:
        log.warning(
            "the development identity issuer is on: any holder of an admin token can mint "
            "workload identities; turn identity.dev_issuer off in production"
        )
    return Services(
        settings,
        clock,
        storage,
        box,
        keys,
        identity,
        registry,
        broker,
        policy,
        events,
        replay,
        http,
        revocations,
        approvals,
        exceptions,
        chain,
        reports,
        signal_sender=signal_sender,
        signal_receiver=signal_receiver,
    )
