"""Typed, frozen configuration, built once at the edge (STYLE.md rule 5).

Sources, later ones winning: built-in defaults, a TOML file, then ``TASKBOUND_*``
environment variables (``TASKBOUND_SERVER__PORT=9000``: ``__`` separates nesting levels;
list and table values are JSON). Unknown keys in either source are an error, and so is any
value that fails validation. Secrets are :class:`pydantic.SecretStr` and never printed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from taskbound.core.redact import DEFAULT_REDACT_KEYS, parse_pointer
from taskbound.core.signals import (
    CAEP_CREDENTIAL_CHANGE,
    CAEP_SESSION_REVOKED,
    RISC_ACCOUNT_DISABLED,
    RISC_ACCOUNT_PURGED,
    RISC_CREDENTIAL_COMPROMISE,
)
from taskbound.errors import ConfigError

ENV_PREFIX = "TASKBOUND_"
# Environment variables that are not configuration keys (read by the CLI or the tests).
_ENV_NOT_CONFIG = frozenset(
    {
        "TASKBOUND_CONFIG",
        "TASKBOUND_URL",
        "TASKBOUND_ADMIN_TOKEN",
        # The agent SDK's identity (taskbound.sdk.identity_from_env), not the server's.
        "TASKBOUND_IDENTITY_TOKEN_FILE",
        "TASKBOUND_TEST_POSTGRES_URL",
        "TASKBOUND_TEST_REDIS_URL",
        "TASKBOUND_REQUIRE_SERVICES",
    }
)

SPIFFE_JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "taskbound"


def default_kek_file() -> Path:
    # Deliberately outside the data directory: the KEK is never stored beside the data.
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "taskbound" / "kek"


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # The URL agents use to reach this server; DPoP `htu` and the token issuer derive from it.
    public_url: str | None = None
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=256 * 1024)
    # Background sweep that expires tasks past their TTL and prunes retired keys.
    sweep_interval_seconds: float = Field(5.0, gt=0, le=3600)


class StorageConfig(_Section):
    # Default: SQLite in data_dir. Also postgresql+psycopg://… or memory:// (tests only).
    url: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)


class KeysConfig(_Section):
    algorithm: Literal["EdDSA", "ES256"] = "EdDSA"
    # The key-encryption key: base64url/hex text of 32 bytes, from the environment
    # (TASKBOUND_KEYS__KEK) or a file. Never stored in the database.
    kek: SecretStr | None = None
    kek_file: Path | None = None
    # In dev mode only, a KEK file is generated on first start if none is configured.
    generate_kek_if_missing: bool = True


class CredentialsConfig(_Section):
    max_ttl_seconds: int = Field(600, ge=10, le=24 * 3600)
    task_max_ttl_seconds: int = Field(3600, ge=10, le=7 * 24 * 3600)
    clock_leeway_seconds: int = Field(30, ge=0, le=300)


class DPoPConfig(_Section):
    algorithms: tuple[str, ...] = ("EdDSA", "Ed25519", "ES256")
    iat_window_seconds: int = Field(60, ge=1, le=600)
    # Where proof jtis are remembered: this process's memory (one replica), or Redis, shared
    # by every replica so a proof replayed at another replica is caught too.
    replay_cache: Literal["memory", "redis"] = "memory"
    redis_url: SecretStr | None = None
    replay_cache_max_entries: int = Field(1_000_000, ge=1000)

    @model_validator(mode="after")
    def _asymmetric_only(self) -> DPoPConfig:
        if self.replay_cache == "redis" and self.redis_url is None:
            raise ValueError("dpop.replay_cache = redis needs dpop.redis_url")
        for alg in self.algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ValueError(f"DPoP algorithm {alg!r} is not asymmetric")
        return self


class TrustDomainConfig(_Section):
    """A SPIFFE trust domain whose JWT-SVIDs are accepted, with its bundle (JWKS)."""

    name: str
    jwks_file: Path | None = None
    jwks_url: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TrustDomainConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("a trust domain needs exactly one of jwks_file or jwks_url")
        return self


class OIDCIssuerConfig(_Section):
    """An OIDC issuer whose ID tokens are mapped to SPIFFE IDs by a template."""

    issuer: str
    audience: str
    spiffe_id_template: str
    jwks_url: str | None = None  # discovered from the issuer when absent
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    required_claims: dict[str, str] = Field(default_factory=dict)


class IdentityConfig(_Section):
    # The `aud` a workload identity token must carry; defaults to the public URL.
    audience: str | None = None
    # The built-in development issuer (JWT-SVIDs for local use and demos). Never in production.
    dev_issuer: bool = True
    dev_trust_domain: str = "taskbound.local"
    svid_algorithms: tuple[str, ...] = SPIFFE_JWT_ALGORITHMS
    trust_domains: tuple[TrustDomainConfig, ...] = ()
    oidc: tuple[OIDCIssuerConfig, ...] = ()
    jwks_refresh_seconds: int = Field(300, ge=10)
    jwks_min_refresh_seconds: int = Field(30, ge=1)


class GatewayConfig(_Section):
    """The tool-boundary gateway at /{tool}/… (DESIGN.md §3 flow 5)."""

    # Run the gateway inside `taskbound serve` (it can also run alone: `taskbound gateway`).
    enabled: bool = True
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    connect_timeout_seconds: float = Field(5.0, gt=0, le=60)
    upstream_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    max_upstream_connections: int = Field(256, ge=1, le=10_000)
    # How long a liveness answer (credential, task, agent, owner) may be reused. Changes
    # made in this process reach the gateway at once; other processes within this bound.
    liveness_ttl_seconds: float = Field(1.0, ge=0, le=30)
    credential_cache_entries: int = Field(100_000, ge=0)
    # RFC 9449 §8: require server-provided nonces in DPoP proofs.
    require_dpop_nonce: bool = False
    nonce_lifetime_seconds: int = Field(300, ge=10, le=3600)
    # MCP methods passed through besides tools/call and tools/list (which are decided).
    mcp_pass_methods: tuple[str, ...] = ("initialize", "ping", "notifications/*")
    # Lifetime of the Txn-Token (draft-ietf-oauth-transaction-tokens) sent with every
    # forwarded call, and of the one presented in an upstream token exchange.
    txn_token_ttl_seconds: int = Field(60, ge=10, le=600)


class RevocationConfig(_Section):
    """How every gateway follows the revocation log (DESIGN.md §3 flow 7)."""

    # A gateway that has not confirmed its feed for this long refuses calls with 503
    # `revocation_feed_stale` until it has caught up.
    staleness_bound_seconds: float = Field(5.0, ge=0.5, le=300)
    # How often the feed is confirmed (one catch-up query) when no notification came; on
    # SQLite, how often it polls. Must be well under the staleness bound.
    heartbeat_seconds: float = Field(1.0, ge=0.05, le=60)
    # PostgreSQL: the connection to LISTEN on, when storage.url goes through a pooler that
    # cannot LISTEN (transaction pooling). Defaults to storage.url.
    listen_url: SecretStr | None = None

    @model_validator(mode="after")
    def _heartbeat_within_bound(self) -> RevocationConfig:
        if self.heartbeat_seconds * 2 > self.staleness_bound_seconds:
            raise ValueError(
                "revocation.heartbeat_seconds must be at most half of staleness_bound_seconds"
            )
        return self


# --- Shared Signals (OpenID SSF, CAEP, RISC; docs/signals.md) ----------------------------

# A receiver's or transmitter's name: it appears in URLs (/v1/signals/{name}), in the
# cause of the changes it makes ("signal:<name>") and as the key of the delivery cursor.
_SIGNAL_NAME = r"^[a-z0-9_-]{1,64}$"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_signal_url(url: str, what: str) -> str:
    """An absolute http(s) URL without credentials or fragment; plain http only to a
    loopback host (a SET or a key set in clear text is readable and forgeable on the way)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not carry credentials (use authorization)")
    if parts.fragment:
        raise ValueError(f"{what} must not have a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{what} must use https (plain http only to a loopback host)")
    return url


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} name {name!r} is used twice")
        seen.add(name)


class SignalReceiverConfig(_Section):
    """A Shared Signals receiver this server pushes SETs to (RFC 8935)."""

    name: str = Field(pattern=_SIGNAL_NAME)
    endpoint: str = Field(min_length=1, max_length=2048)
    # The `aud` of the SETs it is sent (as the receiver expects it; often its endpoint).
    audience: str = Field(min_length=1, max_length=2048)
    # The whole Authorization header value sent with each push, e.g. "Bearer …".
    authorization: SecretStr | None = None
    # On the very first start, deliver the whole revocation log instead of only what
    # happens from now on.
    from_start: bool = False

    @model_validator(mode="after")
    def _endpoint(self) -> SignalReceiverConfig:
        check_signal_url(self.endpoint, f"signals.receivers[{self.name}].endpoint")
        return self


class SignalTransmitterConfig(_Section):
    """A Shared Signals transmitter whose SETs are accepted at /v1/signals/{name}."""

    name: str = Field(pattern=_SIGNAL_NAME)
    # The exact `iss` of its SETs.
    issuer: str = Field(min_length=1, max_length=2048)
    jwks_file: Path | None = None
    jwks_url: str | None = None
    # Pinned per transmitter (RFC 8725 §3.1): a SET signed with anything else is refused.
    algorithms: tuple[str, ...] = Field(("ES256", "EdDSA"), min_length=1)
    # The `aud` its SETs must name; defaults to this server's issuer (its public URL).
    audience: str | None = Field(None, min_length=1, max_length=2048)
    accepted_events: tuple[str, ...] = Field(
        (
            RISC_ACCOUNT_DISABLED,
            RISC_ACCOUNT_PURGED,
            RISC_CREDENTIAL_COMPROMISE,
            CAEP_CREDENTIAL_CHANGE,
            CAEP_SESSION_REVOKED,
        ),
        min_length=1,
    )
    # What an accepted event does to the agent it names...
    action: Literal["suspend", "quarantine"] = "suspend"
    # ...except RISC credential-compromise: a leaked credential means the agent must not
    # simply be resumed, so by default it is quarantined.
    compromise_action: Literal["suspend", "quarantine"] = "quarantine"
    # When set, a push must carry exactly this Authorization header value (RFC 8935 §2.4
    # `authentication_failed` otherwise); the SET signature is checked either way.
    authorization: SecretStr | None = None

    @model_validator(mode="after")
    def _check(self) -> SignalTransmitterConfig:
        where = f"signals.transmitters[{self.name}]"
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError(f"{where} needs exactly one of jwks_file or jwks_url")
        if self.jwks_url is not None:
            check_signal_url(self.jwks_url, f"{where}.jwks_url")
        for alg in self.algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ValueError(f"{where}: algorithm {alg!r} is not asymmetric")
        if any(not event for event in self.accepted_events):
            raise ValueError(f"{where}: accepted_events has an empty event type")
        return self


class SignalsConfig(_Section):
    """Shared Signals out (SETs pushed to receivers) and in (SETs from transmitters)."""

    receivers: tuple[SignalReceiverConfig, ...] = ()
    transmitters: tuple[SignalTransmitterConfig, ...] = ()
    # The oldest `iat` an incoming SET may have; its jti is remembered this long.
    max_age_seconds: int = Field(3600, ge=10, le=7 * 24 * 3600)
    # Outgoing: the longest wait between two attempts at a receiver that fails.
    retry_max_seconds: float = Field(300.0, gt=0, le=24 * 3600)
    # Outgoing: how often the log is checked when no revocation woke the sender.
    poll_interval_seconds: float = Field(5.0, gt=0, le=3600)
    # Outgoing: the limit on one push, connection to response.
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    # Incoming: how often a transmitter's key set is re-read, and at most how often an
    # unknown `kid` makes it re-read sooner.
    jwks_refresh_seconds: int = Field(300, ge=1)
    jwks_min_refresh_seconds: int = Field(30, ge=0)

    @model_validator(mode="after")
    def _unique_names(self) -> SignalsConfig:
        _unique([r.name for r in self.receivers], "signals receiver")
        _unique([t.name for t in self.transmitters], "signals transmitter")
        return self


class DelegationConfig(_Section):
    """Token exchange (RFC 8693) to sub-agents: chains that only narrow."""

    # The deepest chain: orchestrator -> sub-agent is depth 1.
    max_depth: int = Field(3, ge=1, le=8)
    # A credential may be exchanged only once (a second exchange is refused).
    single_use: bool = False


class ApprovalsConfig(_Section):
    """Human approval of one exact action (docs/approvals.md)."""

    # How long a held call waits for a decision; undecided, it expires.
    pending_ttl_seconds: int = Field(900, ge=10, le=7 * 24 * 3600)
    # How long an approved call may take to be retried (once) before the approval lapses.
    use_ttl_seconds: int = Field(300, ge=1, le=24 * 3600)
    # Whether the accountable owner of the task (or of the acting agent) may decide its
    # own agent's call. Off: separation of duties.
    owner_may_approve: bool = False
    # Distinct approvers an admin-tier action needs.
    admin_quorum: int = Field(2, ge=1, le=10)
    # Whether an admin token may vote in a person's name (`as_owner`) through the admin API
    # and CLI, for automation. Off: people decide only when signed in to the web UI.
    admin_api_votes: bool = True
    # A signed, Slack-compatible notification of every new approval (none when unset).
    webhook_url: str | None = Field(None, min_length=1, max_length=2048)
    webhook_secret: SecretStr | None = None
    # Further attempts after a failed delivery, with exponential backoff.
    webhook_retries: int = Field(5, ge=0, le=20)
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    # Accept decisions acknowledged by the chat system the webhook notifies (a bridge such
    # as a Slack app), signed with webhook_secret (POST /v1/approvals/{id}/acknowledge).
    webhook_decisions: bool = False

    @model_validator(mode="after")
    def _webhook(self) -> ApprovalsConfig:
        if self.webhook_url is not None:
            check_signal_url(self.webhook_url, "approvals.webhook_url")
            secret = self.webhook_secret
            if secret is None or len(secret.get_secret_value()) < 16:
                raise ValueError(
                    "approvals.webhook_url needs approvals.webhook_secret (16 characters or more)"
                )
        if self.webhook_decisions and (
            self.webhook_secret is None or len(self.webhook_secret.get_secret_value()) < 16
        ):
            raise ValueError(
                "approvals.webhook_decisions needs approvals.webhook_secret (16 characters or more)"
            )
        return self


class BreakGlassConfig(_Section):
    """Break-glass exceptions (docs/breakglass.md)."""

    # The hard maximum between a grant and its expiry; no grant may ask for more.
    max_duration_seconds: int = Field(4 * 3600, ge=60, le=7 * 24 * 3600)
    # The expiry of a grant that names none.
    default_duration_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # The shortest justification, in characters.
    min_justification: int = Field(20, ge=1, le=1000)
    # How long an ended exception may wait for its review before it is overdue.
    review_within_seconds: int = Field(3 * 24 * 3600, ge=60, le=90 * 24 * 3600)

    @model_validator(mode="after")
    def _durations(self) -> BreakGlassConfig:
        if self.default_duration_seconds > self.max_duration_seconds:
            raise ValueError(
                "breakglass.default_duration_seconds must not exceed max_duration_seconds"
            )
        return self


OidcAlg = Literal["RS256", "PS256", "ES256", "EdDSA"]
_OIDC_ALGS: tuple[OidcAlg, ...] = ("RS256", "ES256", "EdDSA")


class OidcConfig(_Section):
    """Sign-in to the web UI with an OpenID Connect provider (authorization code + PKCE)."""

    # The provider's exact issuer; its discovery document is read from
    # {issuer}/.well-known/openid-configuration.
    issuer: str = Field(..., min_length=1, max_length=2048)
    client_id: str = Field(..., min_length=1, max_length=512)
    client_secret: SecretStr | None = None
    # The ID token claim naming the person, and the owner field it must equal exactly.
    owner_claim: str = Field("email", min_length=1, max_length=128)
    owner_field: Literal["id", "contact"] = "contact"
    # ID token signature algorithms accepted (never "none").
    algorithms: list[OidcAlg] = Field(default_factory=lambda: list(_OIDC_ALGS), min_length=1)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email"], min_length=1)
    timeout_seconds: float = Field(10.0, gt=0, le=60)

    @model_validator(mode="after")
    def _issuer(self) -> OidcConfig:
        parts = urlsplit(self.issuer)
        local = parts.hostname in ("127.0.0.1", "localhost", "::1")
        if parts.scheme != "https" and not (parts.scheme == "http" and local):
            raise ValueError("ui.oidc.issuer must be https (http only on loopback)")
        if "openid" not in self.scopes:
            raise ValueError("ui.oidc.scopes must include openid")
        return self


class UiConfig(_Section):
    """The web UI under /ui/ (docs/ui.md)."""

    enabled: bool = True
    # Sign-in with a password set by `taskbound ui set-password` (single-node use).
    local_passwords: bool = True
    oidc: OidcConfig | None = None
    # How long a sign-in lasts.
    session_ttl_seconds: int = Field(8 * 3600, ge=300, le=7 * 24 * 3600)
    # Secure cookies (and the __Host- prefix). Off only for plain-http development on
    # something other than localhost; browsers accept secure cookies on http://localhost.
    secure_cookies: bool = True
    # Failed sign-ins per owner and per client address within the window before refusal.
    max_failed_signins: int = Field(5, ge=1, le=100)
    failed_signin_window_seconds: int = Field(900, ge=10, le=24 * 3600)


class AuditConfig(_Section):
    """The audit chain (docs/audit-format.md)."""

    # Sign a checkpoint of the chain's head this often (when it has moved); 0: only on
    # demand (`taskbound audit checkpoint`).
    checkpoint_interval_seconds: int = Field(300, ge=0, le=24 * 3600)
    # Where checkpoints are published outside the database, as they are made: a JSON
    # Lines file (appended) and/or a URL (POSTed; https, or http on loopback).
    checkpoint_file: Path | None = None
    checkpoint_webhook_url: str | None = Field(None, min_length=1, max_length=2048)
    # The tools whose calls' arguments the gateway records in their audit records,
    # redacted ("*": every tool). None by default: the argument digest says which
    # arguments without keeping them.
    arguments_tools: list[str] = Field(default_factory=list)
    # Member names (case-insensitive fnmatch patterns, any depth) and RFC 6901 JSON
    # Pointers ("*" a segment matching any member or index) whose values are recorded as
    # "[redacted]". Setting redact_keys replaces the default list.
    redact_keys: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACT_KEYS))
    redact_paths: list[str] = Field(default_factory=list)
    # The longest recorded arguments (RFC 8785 form, after redaction); longer ones are
    # recorded as {"truncated": true, "bytes": N}.
    arguments_max_bytes: int = Field(4096, ge=256, le=65536)

    @model_validator(mode="after")
    def _webhook(self) -> AuditConfig:
        if self.checkpoint_webhook_url is not None:
            check_signal_url(self.checkpoint_webhook_url, "audit.checkpoint_webhook_url")
        return self

    @model_validator(mode="after")
    def _arguments(self) -> AuditConfig:
        for tool in self.arguments_tools:
            if not tool or len(tool) > 128:
                raise ValueError(f"audit.arguments_tools: {tool!r} is not a tool id or '*'")
        for pattern in self.redact_keys:
            if not pattern or len(pattern) > 256:
                raise ValueError(
                    f"audit.redact_keys: {pattern!r} must be a pattern of 1 to 256 characters"
                )
        for path in self.redact_paths:
            try:
                tokens = parse_pointer(path)
            except ValueError as exc:
                raise ValueError(f"audit.redact_paths: {exc}") from None
            if not tokens:
                raise ValueError(
                    "audit.redact_paths: '' would redact all the arguments; "
                    "leave the tool out of audit.arguments_tools instead"
                )
        return self


class ReportsConfig(_Section):
    """Thresholds of the posture findings (docs/reports.md)."""

    # A ceiling spanning this many tools or more is a blanket-token pattern.
    many_tools: int = Field(5, ge=2, le=1000)
    # An agent that left at least this share of its granted actions unused is over-granted.
    unused_share: float = Field(0.5, gt=0, le=1)
    # A task that left at least this share of its granted actions unused asked for more
    # than it used (ended tasks only, granted at least task_min_actions actions).
    task_unused_share: float = Field(0.5, gt=0, le=1)
    task_min_actions: int = Field(2, ge=1, le=10_000)
    # Credential and task TTL caps above these are findings (and partly met controls).
    max_credential_ttl_seconds: int = Field(900, ge=10, le=24 * 3600)
    max_task_ttl_seconds: int = Field(8 * 3600, ge=10, le=7 * 24 * 3600)
    # A break-glass exception granted for longer than this is standing authority.
    standing_breakglass_seconds: int = Field(4 * 3600, ge=60, le=7 * 24 * 3600)
    # A tool whose one static upstream secret this many agents' ceilings reach.
    shared_secret_agents: int = Field(3, ge=2, le=10_000)
    # Revocation staleness bounds above this are only partly met.
    max_revocation_staleness_seconds: float = Field(30.0, gt=0, le=300)
    # The latest checkpoint must be at most this many checkpoint intervals old.
    checkpoint_max_intervals: int = Field(3, ge=1, le=1000)
    # The alignment report verifies the audit chain itself only up to this many records;
    # above, it reports the chain as not verified unless a verification is passed in.
    verify_max_records: int = Field(200_000, ge=0)
    # The alignment report measures unused authority over this many days before now.
    window_days: int = Field(30, ge=1, le=3660)
    # The most tasks one report reads (tasks created in its window).
    max_tasks: int = Field(100_000, ge=1, le=10_000_000)


class PolicyConfig(_Section):
    # A directory of *.cedar files; the default pack shipped with taskbound when absent.
    dir: Path | None = None
    # What `context.environment` says to policies (e.g. development, staging, production).
    environment: str = Field("development", min_length=1, max_length=64)
    # Reload when the files change (polling).
    watch: bool = True
    watch_interval_seconds: float = Field(2.0, gt=0, le=3600)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Settings(_Section):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    keys: KeysConfig = KeysConfig()
    credentials: CredentialsConfig = CredentialsConfig()
    dpop: DPoPConfig = DPoPConfig()
    identity: IdentityConfig = IdentityConfig()
    policy: PolicyConfig = PolicyConfig()
    gateway: GatewayConfig = GatewayConfig()
    revocation: RevocationConfig = RevocationConfig()
    delegation: DelegationConfig = DelegationConfig()
    signals: SignalsConfig = SignalsConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    breakglass: BreakGlassConfig = BreakGlassConfig()
    ui: UiConfig = UiConfig()
    audit: AuditConfig = AuditConfig()
    reports: ReportsConfig = ReportsConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.credentials.max_ttl_seconds > self.credentials.task_max_ttl_seconds:
            raise ValueError("credentials.max_ttl_seconds must not exceed task_max_ttl_seconds")
        url = self.public_url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"server.public_url must be an absolute http(s) URL, got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError("server.public_url must not have a query or fragment")
        return self

    # --- derived values ------------------------------------------------------------------

    @property
    def public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"

    @property
    def issuer(self) -> str:
        """The exact `iss` of every credential: the public URL."""
        return self.public_url

    @property
    def identity_audience(self) -> str:
        return self.identity.audience or self.public_url

    @property
    def storage_url(self) -> str:
        if self.storage.url:
            return self.storage.url
        return f"sqlite+aiosqlite:///{self.storage.data_dir / 'taskbound.db'}"

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with every secret masked, for `config show` and logs."""
        data = self.model_dump(mode="json")
        if self.keys.kek is not None:
            data["keys"]["kek"] = "**********"
        if self.dpop.redis_url is not None:
            data["dpop"]["redis_url"] = "**********"
        if self.revocation.listen_url is not None:
            data["revocation"]["listen_url"] = "**********"
        if self.approvals.webhook_secret is not None:
            data["approvals"]["webhook_secret"] = "**********"  # noqa: S105 - a mask
        for kind in ("receivers", "transmitters"):
            for entry in data["signals"][kind]:
                if entry.get("authorization") is not None:
                    entry["authorization"] = "**********"
        return data


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"configuration key {'.'.join(path)} conflicts with a scalar value")
        node = child
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(path) < 2 or not all(path):
            raise ConfigError(
                f"environment variable {name} is not a configuration key "
                "(expected TASKBOUND_<SECTION>__<KEY>)"
            )
        value: Any = raw
        stripped = raw.strip()
        if stripped[:1] in ("[", "{"):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"environment variable {name} is not valid JSON: {exc}") from None
        _set_path(result, path, value)
    return result


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from a TOML file (optional), the environment and explicit
    overrides (e.g. CLI flags). Raises :class:`ConfigError` naming every bad key."""
    env = os.environ if environ is None else environ
    if path is None and env.get("TASKBOUND_CONFIG"):
        path = env["TASKBOUND_CONFIG"]
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {file}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"configuration file {file} is not valid TOML: {exc}") from None
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
