"""Typed, frozen configuration, built once at the edge (STYLE.md rule 5).

Sources, later ones winning: built-in defaults, a TOML file, then ``TASKBOUND_*``
environment variables (``TASKBOUND_SERVER__PORT=9000``: ``__`` separates nesting levels;
list and table values are JSON). Unknown keys in either source are an error, and so is any
value that fails validation. Secrets are :class:`pydantic.SecretStr` and never printed.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from taskbound.errors import ConfigError

ENV_PREFIX = "TASKBOUND_"
# Environment variables that are not configuration keys (read by the CLI or the tests).
_ENV_NOT_CONFIG = frozenset(
    {
        "TASKBOUND_CONFIG",
        "TASKBOUND_URL",
        "TASKBOUND_ADMIN_TOKEN",
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
