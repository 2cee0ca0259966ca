"""`taskbound token`: delegation by RFC 8693 token exchange from scripts (docs/delegation.md),
and the private DPoP keys such scripts hold.

An exchange needs two proofs of possession (RFC 9449), both made here, locally, and never
sent anywhere but in the request: ``subject_dpop``, by the parent's key for the subject
token (its consent), and the ``DPoP`` header, by the delegate's key (which the new
credential is bound to). The token endpoint's URL the proofs name is the one the server
publishes in its RFC 8414 metadata, so a script may talk to one replica directly.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import typer

from taskbound.cli.common import JsonOption, UrlOption, err_console, fail, handled, print_json
from taskbound.core.dpop import make_dpop_proof
from taskbound.core.exchange import ACCESS_TOKEN_TYPE, GRANT_TYPE, ID_TOKEN_TYPE, JWT_TOKEN_TYPE
from taskbound.core.keys import (
    SIGNING_ALGORITHMS,
    PrivateKey,
    generate_key,
    private_key_from_bytes,
    private_key_to_bytes,
)

token_app = typer.Typer(
    help="Delegate a task credential by token exchange (RFC 8693); DPoP keys for scripts.",
    no_args_is_help=True,
)

TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path, not a secret
METADATA_PATH = "/.well-known/oauth-authorization-server"
# JWK key type and curve -> the signing algorithm taskbound uses with it.
_ALGORITHM_OF = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-256"): "ES256"}
_ACTOR_TOKEN_TYPES = {"jwt": JWT_TOKEN_TYPE, "id_token": ID_TOKEN_TYPE}
MAX_TOKEN_FILE = 64 * 1024


def load_private_jwk(path: Path) -> PrivateKey:
    """A private signing key from a JWK file (as `taskbound token keygen` writes): Ed25519
    (EdDSA) or P-256 (ES256). Exits with a clear message when it is not one."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", code="invalid_request", exit_code=2)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        err_console.print(
            f"[yellow]warning[/]: {path} is readable by others; a private key should be 0600"
        )
    try:
        jwk = json.loads(data)
    except ValueError:
        fail(f"{path} is not a JWK (not JSON)", code="invalid_request", exit_code=2)
    if not isinstance(jwk, dict):
        fail(f"{path} is not a JWK (not a JSON object)", code="invalid_request", exit_code=2)
    alg = jwk.get("alg") or _ALGORITHM_OF.get((str(jwk.get("kty")), str(jwk.get("crv"))))
    if alg not in SIGNING_ALGORITHMS:
        fail(
            f"{path}: only Ed25519 (EdDSA) and P-256 (ES256) private keys are supported",
            code="invalid_request",
            exit_code=2,
        )
    try:
        return private_key_from_bytes(data, str(alg))
    except ValueError as exc:
        fail(f"{path}: {exc}", code="invalid_request", exit_code=2)


def _read_token(source: str, what: str) -> str:
    """A token from a file, or from standard input for ``-``; surrounding blanks dropped."""
    try:
        if source == "-":
            text = sys.stdin.read(MAX_TOKEN_FILE + 1)
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read(MAX_TOKEN_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the {what} from {source}: {exc}", code="invalid_request", exit_code=2)
    token = text.strip()
    if not token or len(token) > MAX_TOKEN_FILE or any(c.isspace() for c in token):
        fail(f"{source} does not hold one {what}", code="invalid_request", exit_code=2)
    return token


def _proof(key: PrivateKey, url: str, access_token: str | None = None) -> str:
    return make_dpop_proof(
        key,
        method="POST",
        url=url,
        now=datetime.now(UTC),
        jti=secrets.token_urlsafe(16),
        access_token=access_token,
    )


@token_app.command("keygen")
def keygen(
    out: Path = typer.Argument(..., help="Where to write the private JWK (created mode 0600)."),
    alg: str = typer.Option("EdDSA", "--alg", help="EdDSA (Ed25519) or ES256 (P-256)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a new private DPoP key as a JWK file and print its RFC 7638 thumbprint (the
    `cnf.jkt` of credentials bound to it)."""
    if alg not in SIGNING_ALGORITHMS:
        fail("--alg must be EdDSA or ES256", code="invalid_request", exit_code=2)
    key = generate_key(alg)
    jwk = {**json.loads(private_key_to_bytes(key)), "alg": alg, "kid": key.kid}
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(out, flags, 0o600)
    except FileExistsError:
        fail(f"{out} exists (pass --force to replace it)", code="conflict", exit_code=2)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}", code="invalid_request", exit_code=2)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        # An existing file replaced with --force keeps its inode: make it private too.
        os.fchmod(f.fileno(), 0o600)
        f.write(json.dumps(jwk, indent=2, sort_keys=True) + "\n")
    typer.echo(key.kid)


@token_app.command("exchange")
def exchange(
    subject_source: str = typer.Option(
        ..., "--subject-token", help="File holding the credential to delegate, or - for stdin."
    ),
    subject_key: Path = typer.Option(
        ..., "--subject-key", help="The private JWK that credential is bound to (its holder's)."
    ),
    actor_source: str = typer.Option(
        ...,
        "--actor-token",
        help="File holding the delegate's workload identity token (JWT-SVID), or - for stdin.",
    ),
    actor_key: Path = typer.Option(
        ..., "--actor-key", help="The delegate's private JWK: the new credential is bound to it."
    ),
    actor_token_type: str = typer.Option(
        "jwt", "--actor-token-type", help="jwt (a JWT-SVID) or id_token (OIDC)."
    ),
    scope: list[str] | None = typer.Option(
        None, "--scope", help="Narrow to these action names (and/or tool:tier); repeatable."
    ),
    resource: list[str] | None = typer.Option(
        None, "--resource", help="RFC 8707 resource (the tool's audience URI); repeatable."
    ),
    audience: list[str] | None = typer.Option(
        None, "--audience", help="The tool's id or audience URI; repeatable."
    ),
    authorization_details: str | None = typer.Option(
        None,
        "--authorization-details",
        help='RFC 9396 JSON, e.g. \'[{"type":"taskbound_tool","constraints":{"repo":"web"}}]\'.',
    ),
    url: str = UrlOption,
    as_json: bool = JsonOption,
) -> None:
    """Delegate a task credential to another agent: a narrower credential bound to the
    delegate's key. Prints the new access token (or, with --json, the whole response)."""
    stdin = "-"
    if subject_source == stdin and actor_source == stdin:
        fail("only one of --subject-token and --actor-token can be -", exit_code=2)
    if actor_token_type not in _ACTOR_TOKEN_TYPES:
        fail("--actor-token-type must be jwt or id_token", code="invalid_request", exit_code=2)
    if authorization_details is not None:
        try:
            json.loads(authorization_details)
        except ValueError:
            fail("--authorization-details is not JSON", code="invalid_request", exit_code=2)
    subject = _read_token(subject_source, "subject token")
    actor = _read_token(actor_source, "actor token")
    parent_key = load_private_jwk(subject_key)
    delegate_key = load_private_jwk(actor_key)

    base = url.rstrip("/")
    form: dict[str, str | list[str]] = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "actor_token": actor,
        "actor_token_type": _ACTOR_TOKEN_TYPES[actor_token_type],
    }
    if scope:
        form["scope"] = " ".join(scope)
    if resource:
        form["resource"] = list(resource)
    if audience:
        form["audience"] = list(audience)
    if authorization_details is not None:
        form["authorization_details"] = authorization_details
    with handled(), httpx.Client(base_url=base, timeout=30.0) as http:
        meta = http.get(METADATA_PATH)
        try:
            endpoint = meta.json()["token_endpoint"] if meta.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            endpoint = None
        if not isinstance(endpoint, str):
            fail(f"{base} publishes no token endpoint in its metadata", code="unreachable")
        form["subject_dpop"] = _proof(parent_key, endpoint, access_token=subject)
        response = http.post(
            TOKEN_PATH, data=form, headers={"DPoP": _proof(delegate_key, endpoint)}
        )
    try:
        body: Any = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        error = body.get("error") if isinstance(body, dict) else None
        detail = body.get("error_description") if isinstance(body, dict) else None
        fail(
            str(detail or response.reason_phrase),
            code=str(error or f"http_{response.status_code}"),
        )
    if as_json:
        print_json(body)
    else:
        typer.echo(body["access_token"])
