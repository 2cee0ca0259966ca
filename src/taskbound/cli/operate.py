"""`taskbound tasks|credentials|keys|revocations|identity|admin`: operating a running server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from urllib.parse import quote

import typer
from rich.table import Table

from taskbound.cli.common import (
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    console,
    handled,
    print_json,
    print_table,
)

tasks_app = typer.Typer(help="Tasks: inspect and revoke.", no_args_is_help=True)
credentials_app = typer.Typer(help="Credentials: revoke one by its jti.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Signing keys: list, rotate, withdraw; the key-encryption key.", no_args_is_help=True
)
revocations_app = typer.Typer(
    help="The revocation log, and the feed that keeps every gateway current with it.",
    no_args_is_help=True,
)
identity_app = typer.Typer(help="Workload identity (the development issuer).", no_args_is_help=True)
admin_app = typer.Typer(help="Admin access: bootstrap tokens.", no_args_is_help=True)

ConfigOption = typer.Option(
    None, "--config", "-c", envvar="TASKBOUND_CONFIG", help="TOML configuration file."
)
YesOption = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")


@tasks_app.command("list")
def tasks_list(
    agent: str | None = typer.Option(None, help="Only this agent's tasks (SPIFFE ID)."),
    owner: str | None = typer.Option(None, help="Only tasks on behalf of this owner."),
    state: str | None = typer.Option(
        None, help="active, completed, cancelled, expired or revoked."
    ),
    limit: int = typer.Option(100, min=1, max=1000),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List tasks, newest first."""
    params = {k: v for k, v in {"agent": agent, "owner": owner, "state": state}.items() if v}
    params["limit"] = str(limit)
    data = AdminClient(url, token).get("/v1/admin/tasks", params=params)
    if as_json:
        return print_json(data)
    print_table(
        "Tasks",
        ["id", "state", "agent", "owner", "granted", "expires"],
        [
            (
                t["id"],
                t["state"],
                t["agent"],
                t["on_behalf_of"],
                " ".join(f"{g['tool']}:{g['tier']}" for g in t["granted"]),
                t["expires_at"],
            )
            for t in data["tasks"]
        ],
    )


@tasks_app.command("show")
def tasks_show(task_id: str, url: str = UrlOption, token: str = TokenOption) -> None:
    """Show a task and its credentials (JSON)."""
    client = AdminClient(url, token)
    task = client.get(f"/v1/tasks/{task_id}")
    task["credentials"] = client.get(f"/v1/admin/tasks/{task_id}/credentials")["credentials"]
    print_json(task)


@tasks_app.command("revoke")
def tasks_revoke(
    task_id: str,
    reason: str = typer.Option("revoked by an admin", help="Recorded with the revocation."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke a task and every credential issued for it."""
    data = AdminClient(url, token).post(
        f"/v1/admin/tasks/{task_id}/revoke", json={"reason": reason}
    )
    if as_json:
        return print_json(data)
    if data["changed"]:
        console.print(f"[green]revoked[/] {task_id}")
    else:
        console.print(f"[yellow]unchanged[/] {task_id} had already ended ({data['state']})")


@credentials_app.command("revoke")
def credentials_revoke(
    jti: str = typer.Argument(..., help="The credential's jti (from `taskbound tasks show`)."),
    reason: str = typer.Option("revoked by an admin", help="Recorded with the revocation."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke one credential and every credential derived from it.

    Its task stays active; the gateways refuse the credential at once."""
    data = AdminClient(url, token).post(
        f"/v1/admin/credentials/{quote(jti, safe='')}/revoke", json={"reason": reason}
    )
    if as_json:
        return print_json(data)
    if data["changed"]:
        console.print(f"[green]revoked[/] credential {jti} (and any credential derived from it)")
    else:
        console.print(f"[yellow]unchanged[/] {jti} is unknown, expired or already revoked")


@keys_app.command("list")
def keys_list(url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption) -> None:
    """List signing keys (public facts only)."""
    data = AdminClient(url, token).get("/v1/admin/keys")
    if as_json:
        return print_json(data)
    print_table(
        "Signing keys",
        ["kid", "purpose", "alg", "state", "created", "published until"],
        [
            (
                k["kid"],
                k["purpose"],
                k["alg"],
                k["state"],
                k["created_at"],
                k["retire_after"] or "-",
            )
            for k in data["keys"]
        ],
    )


@keys_app.command("rotate")
def keys_rotate(
    purpose: str = typer.Option(
        "credentials", help="credentials, dev_identity, signals, transaction or audit."
    ),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Make a new signing key; the old one stays published until its tokens expire."""
    data = AdminClient(url, token).post("/v1/admin/keys/rotate", params={"purpose": purpose})
    print_json(data) if as_json else console.print(
        f"[green]rotated[/] new {data['alg']} key {data['kid']}"
    )


@keys_app.command("withdraw")
def keys_withdraw(
    kid: str = typer.Argument(
        ...,
        help="The key's kid (from `taskbound keys list`); after `--` when it begins with '-'.",
    ),
    reason: str = typer.Option("signing key withdrawn", help="Recorded with the revocations."),
    yes: bool = YesOption,
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Withdraw a compromised signing key: revoke everything it signed, at once.

    The key is unpublished and no longer trusted, and an active key is replaced by a new
    one. Asks for confirmation unless --yes. To retire a healthy key gracefully, use
    `taskbound keys rotate`."""
    if not yes:
        typer.confirm(
            f"Withdraw key {kid}? Every credential it signed is revoked at once.",
            abort=True,
            err=True,
        )
    data = AdminClient(url, token).post(
        f"/v1/admin/keys/{quote(kid, safe='')}/withdraw", json={"reason": reason}
    )
    if as_json:
        return print_json(data)
    count = data["credentials_revoked"]
    creds = "1 credential" if count == 1 else f"{count} credentials"
    console.print(f"[green]withdrew[/] key {kid} ({creds} revoked)")


@keys_app.command("generate-kek")
def keys_generate_kek() -> None:
    """Print a new random key-encryption key (for TASKBOUND_KEYS__KEK or keys.kek_file)."""
    from taskbound.core.secretbox import generate_kek

    typer.echo(generate_kek())


def _when(iso: str) -> str:
    """An ISO 8601 UTC time as ``YYYY-MM-DD HH:MM:SS`` (the full value is in --json)."""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@revocations_app.command("list")
def revocations_list(
    after: int = typer.Option(0, "--after", min=0, help="Only entries numbered above this."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="At most this many."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """List the revocation log: who revoked what, when and why, in order.

    Entries are credentials, tasks, agents, owners and keys. Page with --after (the last
    seq shown)."""
    data = AdminClient(url, token).get(
        "/v1/admin/revocations", params={"after": str(after), "limit": str(limit)}
    )
    if as_json:
        return print_json(data)
    entries = data["revocations"]
    table = Table(title="Revocations", title_justify="left", header_style="bold cyan")
    # Folded, never cut short: subjects and causes are what one copies into the next
    # command, and a narrow terminal must not hide the end of a reason either.
    for name in ("seq", "time (UTC)", "kind", "subject", "state", "cause", "reason"):
        table.add_column(name, overflow="fold", justify="right" if name == "seq" else "left")
    for e in entries:
        table.add_row(
            str(e["seq"]),
            _when(e["time"]),
            e["kind"],
            e["subject"],
            e["state"] or "-",
            e["cause"],
            e["reason"],
        )
    console.print(table)
    if len(entries) == limit:
        console.print(f"[dim]more may follow: --after {entries[-1]['seq']}[/]")


@revocations_app.command("status")
def revocations_status(
    url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """Show the revocation feed: how current the answering server's gateway is.

    The last entry applied, when the feed last confirmed it is current, and whether it is
    stale (the gateway then refuses calls with 503 revocation_feed_stale). Behind a load
    balancer this is the feed of the one replica that answered."""
    feed = AdminClient(url, token).get("/v1/admin/revocations", params={"limit": "1"})["feed"]
    if as_json:
        return print_json(feed)
    age = feed["age_seconds"]
    print_table(
        "Revocation feed",
        ["last seq applied", "confirmed", "held in memory", "state"],
        [
            (
                feed["seq"],
                "never" if age is None else f"{age:.1f} s ago",
                feed["entries"],
                "[bold red]stale: gateway calls refused[/]"
                if feed["stale"]
                else "[green]current[/]",
            )
        ],
    )


@identity_app.command("mint")
def identity_mint(
    spiffe_id: str = typer.Option(..., "--spiffe-id", help="spiffe://<dev trust domain>/<path>"),
    ttl: int = typer.Option(300, "--ttl", min=10, max=3600, help="Lifetime in seconds."),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Print a JWT-SVID from the development issuer (dev mode only)."""
    data = AdminClient(url, token).post(
        "/v1/admin/dev/identity", json={"spiffe_id": spiffe_id, "ttl_seconds": ttl}
    )
    print_json(data) if as_json else typer.echo(data["token"])


@admin_app.command("init")
def admin_init(
    description: str = typer.Option("bootstrap admin", help="What this token is for."),
    force: bool = typer.Option(False, "--force", help="Create another token even if one exists."),
    config: str | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Create an admin token directly in the database and print it once."""
    from taskbound.config import load_settings
    from taskbound.core.clock import SystemClock
    from taskbound.service.admin import create_admin_token
    from taskbound.storage import open_storage

    async def run() -> tuple[str, str] | None:
        settings = load_settings(config)
        storage = await open_storage(settings.storage_url)
        try:
            if not force and await storage.list_admin_tokens():
                return None
            new = await create_admin_token(storage, SystemClock(), description)
            return new.token, new.record.id
        finally:
            await storage.close()

    with handled():
        result = asyncio.run(run())
    if result is None:
        console.print("[yellow]an admin token exists already[/]; use --force to create another")
        raise typer.Exit(1)
    token, token_id = result
    if as_json:
        return print_json({"token": token, "id": token_id})
    console.print(f"[green]admin token[/] {token_id} (shown once, stored only as a hash):")
    typer.echo(token)
