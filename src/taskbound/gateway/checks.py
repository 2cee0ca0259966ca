"""Every check the gateway makes before a call may pass (DESIGN.md §3 flow 5):

1. the credential (RFC 9068: pinned algorithm, exact issuer, audience = this tool),
2. the DPoP proof (RFC 9449 §4.3 with `ath`, `cnf.jkt`, replay, server nonces),
3. liveness (credential, task, agent and owner all live, from memory kept current) and
   the revocation state fed by the revocation log, refusing with 503 while that feed is
   staler than its bound,
4. the action (HTTP route or MCP tool) within the credential's tier and actions,
5. the Cedar call decision with the call's real arguments.

Any failure raises a :class:`Refusal` carrying the stable code, the HTTP status and the
`WWW-Authenticate` error the specs ask for; anything unforeseen is a refusal too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from taskbound.config import Settings
from taskbound.core.clock import Clock, to_epoch
from taskbound.core.decisions import Situation
from taskbound.core.dpop import verify_dpop_proof
from taskbound.core.model import (
    Action,
    Agent,
    AgentState,
    CredentialRecord,
    KeyPurpose,
    Owner,
    Revocation,
    RevocationKind,
    Task,
    TaskState,
    Tool,
)
from taskbound.core.policy import Decision, Outcome
from taskbound.core.revocation import Standing
from taskbound.core.tokens import CredentialClaims, verify_credential
from taskbound.errors import (
    InvalidDPoPProof,
    InvalidToken,
    TaskboundError,
    UseDPoPNonce,
)
from taskbound.service.events import Change, Event, Events
from taskbound.service.identity import unverified_kid
from taskbound.service.keys import KeyManager
from taskbound.service.policy import PolicyEngine
from taskbound.service.revocations import RevocationFeed
from taskbound.storage.base import ReplayCache, Storage


class Refusal(TaskboundError):
    """A refused call. ``www_error`` is the RFC 6750/9449 error for `WWW-Authenticate`."""

    code = "refused"
    status = 403
    default_detail = "the call is refused"

    def __init__(
        self,
        code: str,
        status: int,
        detail: str,
        *,
        internal: str | None = None,
        www_error: str | None = None,
        decision: Decision | None = None,
    ) -> None:
        super().__init__(detail, internal=internal)
        self.code = code  # type: ignore[misc]
        self.status = status  # type: ignore[misc]
        self.www_error = www_error
        self.decision = decision


def invalid_token(internal: str) -> Refusal:
    return Refusal(
        "invalid_token",
        401,
        "the access token is not valid",
        internal=internal,
        www_error="invalid_token",
    )


def insufficient_scope(detail: str, internal: str, decision: Decision | None = None) -> Refusal:
    return Refusal(
        "insufficient_scope",
        403,
        detail,
        internal=internal,
        www_error="insufficient_scope",
        decision=decision,
    )


@dataclass(frozen=True, slots=True)
class Live:
    """What liveness established for a credential, reused for the decision."""

    record: CredentialRecord
    task: Task
    agent: Agent  # the task's agent
    owner: Owner
    holder: Agent  # the agent acting: the task's, or the last delegate of a chain
    holder_owner: Owner  # its owner
    chain: tuple[Agent, ...] = ()  # every agent of a delegation chain


@dataclass(frozen=True, slots=True)
class Admitted:
    """A credential that passed checks 1-3 for this request."""

    token: str
    claims: CredentialClaims
    live: Live


class Expiring:
    """A bounded LRU whose entries also expire (monotonic seconds)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str, now: float) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: str, value: Any, until: float) -> None:
        if self._size <= 0:
            return
        self._items[key] = (until, value)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


class NonceIssuer:
    """Stateless DPoP nonces (RFC 9449 §8): an HMAC of the time window, so every replica
    with the same secret accepts the nonce of the current and the previous window."""

    def __init__(self, secret: bytes, lifetime: int) -> None:
        self._secret = secret
        self._lifetime = lifetime

    def _for(self, window: int) -> str:
        mac = hmac.new(self._secret, window.to_bytes(8, "big"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode().rstrip("=")

    def current(self, now: datetime) -> str:
        return self._for(to_epoch(now) // self._lifetime)

    def valid(self, nonce: str | None, now: datetime) -> bool:
        if nonce is None:
            return False
        window = to_epoch(now) // self._lifetime
        return any(hmac.compare_digest(nonce, self._for(w)) for w in (window, window - 1))


class CallRate:
    """Calls per task in the last 60 s (sliding), for `context.call_rate`."""

    def __init__(self, max_tasks: int = 100_000) -> None:
        self._calls: OrderedDict[str, deque[float]] = OrderedDict()
        self._max = max_tasks

    def hit(self, task_id: str, now: float) -> int:
        calls = self._calls.get(task_id)
        if calls is None:
            calls = self._calls[task_id] = deque()
            while len(self._calls) > self._max:
                self._calls.popitem(last=False)
        self._calls.move_to_end(task_id)
        while calls and calls[0] <= now - 60:
            calls.popleft()
        calls.append(now)
        return len(calls)


class Checks:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        keys: KeyManager,
        policy: PolicyEngine,
        replay: ReplayCache,
        clock: Clock,
        events: Events,
        feed: RevocationFeed,
        nonce_secret: bytes | None = None,
    ) -> None:
        self._settings = settings
        self._storage = storage
        self._keys = keys
        self._policy = policy
        self._replay = replay
        self._clock = clock
        gw = settings.gateway
        self._leeway = timedelta(seconds=settings.credentials.clock_leeway_seconds)
        self._iat_window = timedelta(seconds=settings.dpop.iat_window_seconds)
        self._verified = Expiring(gw.credential_cache_entries)
        self._live = Expiring(gw.credential_cache_entries)
        self._live_ttl = gw.liveness_ttl_seconds
        self._rate = CallRate()
        self._feed = feed
        # Set when this process revoked something: the next call catches the feed up first.
        self._behind = False
        feed.listeners.append(self._on_revocations)
        self.nonces = NonceIssuer(
            nonce_secret or secrets.token_bytes(32), gw.nonce_lifetime_seconds
        )
        events.subscribe(self._on_event)

    def _on_revocations(self, entries: list[Revocation]) -> None:
        self._live.clear()
        if any(e.kind is RevocationKind.KEY for e in entries):
            # A withdrawn key: nothing it signed may be served from the verified cache.
            self._verified.clear()

    def _on_event(self, event: Event) -> None:
        # A revocation or a change of standing in this process: forget every liveness
        # answer at once (they are re-read from the database on the next call).
        if event.change is not Change.TOOL_CHANGED:
            self._live.clear()
            self._behind = True

    # --- 1. credential -------------------------------------------------------------------

    def credential(
        self, authorization: str | None, tool: Tool
    ) -> tuple[str, CredentialClaims, str]:
        """The token, its verified claims and the ``kid`` of the key that signed it."""
        if not authorization:
            raise Refusal(
                "invalid_request", 401, "a DPoP-bound credential is required", www_error=None
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer":
            # RFC 9449 §7.2: a DPoP-bound token used as a bearer token is refused.
            raise invalid_token("bearer use of a DPoP-bound credential")
        if scheme.lower() != "dpop" or not token:
            raise invalid_token("authorization scheme is not DPoP")
        now = self._clock.now()
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached: tuple[CredentialClaims, str] | None = self._verified.get(digest, time.monotonic())
        if cached is not None and cached[0].audience == tool.audience:
            if now >= cached[0].expires_at + self._leeway:
                raise invalid_token("credential expired")
            return token, cached[0], cached[1]
        try:
            claims = verify_credential(
                token,
                keys=self._keys.keyring(KeyPurpose.CREDENTIALS),
                issuer=self._settings.issuer,
                audiences=(tool.audience,),
                algorithms=(self._settings.keys.algorithm,),
                now=now,
                leeway=self._leeway,
            )
        except InvalidToken as exc:
            raise invalid_token(exc.internal) from None
        if claims.tool != tool.id:
            raise invalid_token(f"credential for tool {claims.tool!r} presented at {tool.id!r}")
        kid = unverified_kid(token) or ""  # verified above: the keyring chose the key by it
        remaining = (claims.expires_at + self._leeway - now).total_seconds()
        self._verified.put(digest, (claims, kid), time.monotonic() + max(0.0, remaining))
        return token, claims, kid

    # --- 2. DPoP -------------------------------------------------------------------------

    async def proof(
        self, dpop_headers: list[str], method: str, url: str, token: str, claims: CredentialClaims
    ) -> None:
        if len(dpop_headers) != 1:
            raise Refusal(
                "invalid_dpop_proof",
                401,
                "exactly one DPoP proof is required",
                internal=f"{len(dpop_headers)} DPoP headers",
                www_error="invalid_dpop_proof",
            )
        now = self._clock.now()
        try:
            proof = verify_dpop_proof(
                dpop_headers[0],
                method=method,
                url=url,
                now=now,
                algorithms=self._settings.dpop.algorithms,
                iat_window=self._iat_window,
                access_token=token,
                expected_jkt=claims.jkt,
            )
        except InvalidDPoPProof as exc:
            raise Refusal(
                "invalid_dpop_proof",
                401,
                "the DPoP proof is not valid",
                internal=exc.internal,
                www_error="invalid_dpop_proof",
            ) from None
        if self._settings.gateway.require_dpop_nonce and not self.nonces.valid(proof.nonce, now):
            raise Refusal(
                UseDPoPNonce.code,
                401,
                UseDPoPNonce.default_detail,
                internal="DPoP nonce missing or stale",
                www_error="use_dpop_nonce",
            )
        expires = proof.issued_at + self._iat_window + self._leeway
        if await self._replay.seen(f"dpop:{proof.jkt}:{proof.jti}", expires, now):
            raise Refusal(
                "invalid_dpop_proof",
                401,
                "the DPoP proof is not valid",
                internal=f"DPoP proof jti {proof.jti!r} replayed",
                www_error="invalid_dpop_proof",
            )

    # --- 3. liveness ---------------------------------------------------------------------

    async def liveness(self, claims: CredentialClaims, kid: str) -> Live:
        now = self._clock.now()
        live: Live | None = self._live.get(claims.jti, time.monotonic())
        if live is None:
            record = await self._storage.get_credential(claims.jti)
            task = await self._storage.get_task(claims.task_id)
            inputs = await self._storage.load_grant_inputs(claims.subject, claims.owner_id, [])
            if record is None or task is None or inputs.agent is None or inputs.owner is None:
                raise invalid_token("credential, task, agent or owner unknown")
            holder, holder_owner = inputs.agent, inputs.owner
            chain = [inputs.agent]
            for actor in claims.actors:
                agent = await self._storage.get_agent(actor)
                if agent is None:
                    raise invalid_token(f"delegate {actor} unknown")
                if agent.state is not AgentState.ACTIVE:
                    raise invalid_token(f"delegate {actor} is {agent.state.value}")
                chain.append(agent)
            if claims.actors:
                holder = chain[1]
                # Every delegate's owner must be enabled, not only the holder's.
                for agent in chain[1:]:
                    found_owner = await self._storage.get_owner(agent.owner_id)
                    if found_owner is None or found_owner.disabled:
                        raise invalid_token(f"the owner of delegate {agent.spiffe_id} is disabled")
                    if agent is holder:
                        holder_owner = found_owner
            for ancestor in claims.parents:
                found = await self._storage.get_credential(ancestor)
                if found is None or not found.live_at(now):
                    raise invalid_token(f"credential {ancestor} it was delegated from is not live")
            live = Live(
                record, task, inputs.agent, inputs.owner, holder, holder_owner, tuple(chain)
            )
            self._live.put(claims.jti, live, time.monotonic() + self._live_ttl)
        if live.record.revoked_at is not None:
            raise invalid_token(f"credential revoked: {live.record.revoke_reason}")
        if not live.record.live_at(now):
            raise invalid_token("credential expired")
        if (
            live.record.task_id,
            live.record.tool,
            live.record.tier,
            live.record.agent_id,
            live.record.parent_jti,
            live.record.jkt,
            live.record.kid,
            live.record.exception_id,
        ) != (
            claims.task_id,
            claims.tool,
            claims.tier,
            claims.holder,
            claims.parents[0] if claims.parents else None,
            claims.jkt,
            kid,
            claims.exception,
        ):
            raise invalid_token("credential record does not match the token")
        if live.task.state_at(now) is not TaskState.ACTIVE:
            raise invalid_token(f"task is {live.task.state_at(now).value}")
        if live.agent.state is not AgentState.ACTIVE:
            raise invalid_token(f"agent is {live.agent.state.value}")
        if live.owner.disabled:
            raise invalid_token("owner is disabled")
        return live

    async def revocations(self, claims: CredentialClaims, live: Live) -> None:
        """The revocation state, fed by the log: fail closed when the feed is stale."""
        if self._behind:
            self._behind = False
            try:
                await self._feed.sync()
            except Exception as exc:
                self._behind = True
                raise Refusal(
                    "revocation_feed_stale",
                    503,
                    "the gateway cannot confirm that this credential is not revoked; retry shortly",
                    internal=f"catching up after a local revocation failed: {exc!r}",
                ) from None
            # The catch-up may have waited: the feed must still be fresh now.
            self.fresh_feed()
        record = live.record
        why = self._feed.state.refusal(
            Standing(
                record.jti,
                record.task_id,
                live.agent.spiffe_id,
                live.owner.id,
                record.kid,
                parents=claims.parents,
                actors=claims.actors,
            )
        )
        if why is not None:
            raise invalid_token(why)

    def fresh_feed(self) -> None:
        self._feed.start()
        age = self._feed.stale()
        if age is not None:
            raise Refusal(
                "revocation_feed_stale",
                503,
                "the gateway cannot confirm that this credential is not revoked; retry shortly",
                internal=f"revocation feed last confirmed {age:.1f} s ago",
            )

    # --- 4. action within the credential -------------------------------------------------

    @staticmethod
    def within_credential(action: Action, claims: CredentialClaims) -> None:
        if action.tier != claims.tier:
            # Tiers never mix: a read credential never performs a write.
            raise insufficient_scope(
                f"this credential is for the {claims.tier.value} tier",
                f"{action.name} is {action.tier.value}, credential is {claims.tier.value}",
            )
        if action.name not in claims.actions:
            raise insufficient_scope(
                "this credential does not cover that action",
                f"{action.name} not among the credential's actions",
            )

    # --- 5. decision ---------------------------------------------------------------------

    def decide(
        self,
        admitted: Admitted,
        tool: Tool,
        action: Action,
        arguments: Mapping[str, Any],
        target: str | None,
    ) -> Decision:
        live = admitted.live
        claims = admitted.claims
        rate = self._rate.hit(live.task.id, time.monotonic())
        situation = Situation(
            now=self._clock.now(),
            environment=self._settings.policy.environment,
            call_rate=rate,
            delegation_depth=claims.depth,
            # A credential relying on a break-glass exception: policy sees it, the audit
            # flags the call (the exception's early end revokes the credential).
            exception_active=claims.exception is not None,
        )
        task, variant = live.task, None
        if claims.actors:
            # A delegated credential acts for its delegate, within its own (narrowed)
            # constraints; the decision sees exactly that.
            task = replace(live.task, constraints=dict(claims.constraints))
            variant = claims.jti
        decision = self._policy.decide_call(
            agent=live.holder,
            owner=live.owner,
            task=task,
            variant=variant,
            others=live.chain if claims.actors else (),
            other_owners=(live.holder_owner,) if claims.actors else (),
            tool=tool,
            action_name=action.name,
            arguments=dict(arguments),
            target=target,
            situation=situation,
        )
        if decision.outcome is Outcome.APPROVAL_REQUIRED:
            raise Refusal(
                "approval_required",
                403,
                "this call needs a human approval",
                internal="approval gate: " + ", ".join(decision.determining),
                www_error="insufficient_scope",
                decision=decision,
            )
        if decision.outcome is not Outcome.ALLOW:
            why = ", ".join(decision.determining) or "no policy permits it"
            if decision.errors:
                why += " (errors: " + "; ".join(decision.errors) + ")"
            raise Refusal(
                "policy_denied",
                403,
                "policy denies this call",
                internal=why,
                www_error="insufficient_scope",
                decision=decision,
            )
        return decision

    async def admit(
        self,
        *,
        authorization: str | None,
        dpop_headers: list[str],
        method: str,
        url: str,
        tool: Tool,
        verified: Callable[[CredentialClaims], None] | None = None,
    ) -> Admitted:
        """Checks 1-3. ``verified`` is told the credential's claims as soon as they are
        established, so a later refusal is still attributed to its agent and task."""
        token, claims, kid = self.credential(authorization, tool)
        if verified is not None:
            verified(claims)
        self.fresh_feed()
        await self.proof(dpop_headers, method, url, token, claims)
        live = await self.liveness(claims, kid)
        await self.revocations(claims, live)
        return Admitted(token, claims, live)
