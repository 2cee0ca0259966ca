from __future__ import annotations

from pathlib import Path

import pytest

from taskbound.config import load_settings
from taskbound.core.redact import DEFAULT_REDACT_KEYS
from taskbound.errors import ConfigError


def test_defaults_are_single_node_loopback(tmp_path: Path) -> None:
    s = load_settings(environ={"XDG_DATA_HOME": str(tmp_path)})
    assert s.server.host == "127.0.0.1"
    assert s.public_url == "http://127.0.0.1:8080"
    assert s.issuer == s.public_url
    assert s.identity.dev_issuer is True
    assert s.storage_url.startswith("sqlite+aiosqlite:///")
    assert s.credentials.max_ttl_seconds == 600


def test_file_then_environment_override(tmp_path: Path) -> None:
    cfg = tmp_path / "tb.toml"
    cfg.write_text("[server]\nport = 9000\n[credentials]\nmax_ttl_seconds = 300\n")
    s = load_settings(cfg, environ={"TASKBOUND_SERVER__PORT": "9100"})
    assert s.server.port == 9100
    assert s.credentials.max_ttl_seconds == 300


def test_environment_json_values(tmp_path: Path) -> None:
    s = load_settings(environ={"TASKBOUND_DPOP__ALGORITHMS": '["ES256"]'})
    assert s.dpop.algorithms == ("ES256",)


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[server]\nprot = 1\n", {}, "server.prot: unknown key"),
        ("[nonsense]\na = 1\n", {}, "nonsense: unknown key"),
        ("", {"TASKBOUND_SERVER__NOPE": "1"}, "server.nope: unknown key"),
        ("", {"TASKBOUND_PORT": "1"}, "not a configuration key"),
        ("[server]\nport = 70000\n", {}, "server.port"),
        ('[server]\npublic_url = "ftp://x"\n', {}, "public_url"),
        ('[keys]\nalgorithm = "HS256"\n', {}, "keys.algorithm"),
        ('[dpop]\nalgorithms = ["HS256"]\n', {}, "not asymmetric"),
        ("[credentials]\nmax_ttl_seconds = 7200\ntask_max_ttl_seconds = 3600\n", {}, "max_ttl"),
        ('[[identity.trust_domains]]\nname = "a"\n', {}, "exactly one of jwks_file"),
        ("not toml ===", {}, "not valid TOML"),
        ("", {"TASKBOUND_DPOP__ALGORITHMS": "[bad json"}, "not valid JSON"),
    ],
)
def test_bad_configuration_is_refused_with_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    cfg = tmp_path / "tb.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=env)
    assert needle in info.value.detail


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_secrets_are_masked(tmp_path: Path) -> None:
    s = load_settings(environ={"TASKBOUND_KEYS__KEK": "super-secret-value"})
    assert "super-secret-value" not in repr(s)
    assert "super-secret-value" not in str(s.redacted())
    assert s.keys.kek is not None
    assert s.keys.kek.get_secret_value() == "super-secret-value"


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(ValueError, match="frozen"):
        s.server.port = 1  # type: ignore[misc]


def test_recording_arguments_is_off_by_default() -> None:
    audit = load_settings(environ={}).audit
    assert audit.arguments_tools == []
    assert audit.redact_keys == list(DEFAULT_REDACT_KEYS)
    assert "*password*" in audit.redact_keys
    assert audit.redact_paths == []
    assert audit.arguments_max_bytes == 4096


def test_recording_arguments_from_the_file_and_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "tb.toml"
    cfg.write_text(
        "[audit]\n"
        'arguments_tools = ["issues", "tracker"]\n'
        'redact_keys = ["*password*", "card_*"]\n'
        'redact_paths = ["/body/card_number", "/items/*/note", "/a~1b"]\n'
        "arguments_max_bytes = 256\n"
    )
    audit = load_settings(cfg, environ={}).audit
    assert audit.arguments_tools == ["issues", "tracker"]
    assert audit.redact_keys == ["*password*", "card_*"]  # replaces the defaults
    assert audit.redact_paths == ["/body/card_number", "/items/*/note", "/a~1b"]
    assert audit.arguments_max_bytes == 256
    env = {
        "TASKBOUND_AUDIT__ARGUMENTS_TOOLS": '["*"]',
        "TASKBOUND_AUDIT__REDACT_PATHS": '["/x/0"]',
        "TASKBOUND_AUDIT__ARGUMENTS_MAX_BYTES": "65536",
    }
    audit = load_settings(cfg, environ=env).audit
    assert (audit.arguments_tools, audit.redact_paths, audit.arguments_max_bytes) == (
        ["*"],
        ["/x/0"],
        65536,
    )


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('redact_paths = ["body/card_number"]', "audit.redact_paths: 'body/card_number' is not a"),
        ('redact_paths = ["/ok", "/a~2b"]', "'~' must be followed by 0 or 1"),
        ('redact_paths = [""]', "would redact all the arguments"),
        ("redact_paths = [3]", "audit.redact_paths.0"),
        ('redact_keys = [""]', "audit.redact_keys: '' must be a pattern"),
        ('arguments_tools = [""]', "audit.arguments_tools: '' is not a tool id"),
        ('arguments_tools = "issues"', "audit.arguments_tools"),
        ("arguments_max_bytes = 255", "audit.arguments_max_bytes"),
        ("arguments_max_bytes = 65537", "audit.arguments_max_bytes"),
        ("record_arguments = true", "audit.record_arguments: unknown key"),
    ],
)
def test_bad_argument_recording_is_refused_with_the_key(
    tmp_path: Path, toml: str, needle: str
) -> None:
    cfg = tmp_path / "tb.toml"
    cfg.write_text(f"[audit]\n{toml}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert needle in info.value.detail
