"""The `taskbound` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import typer

from taskbound import __version__
from taskbound.cli.approvals import approvals_app
from taskbound.cli.audit import audit_app
from taskbound.cli.breakglass import breakglass_app
from taskbound.cli.common import console, fail, handled, print_json
from taskbound.cli.operate import (
    ConfigOption,
    admin_app,
    credentials_app,
    identity_app,
    keys_app,
    revocations_app,
    tasks_app,
)
from taskbound.cli.policy import policy_app
from taskbound.cli.registry import agents_app, apply, owners_app, tools_app
from taskbound.cli.report import report_app
from taskbound.cli.token import token_app
from taskbound.config import Settings, load_settings

app = typer.Typer(
    name="taskbound",
    help="Short-lived, task-bound credentials for AI agents, checked at the tool boundary.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and check the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
ui_app = typer.Typer(help="The web UI's local sign-in (docs/ui.md).", no_args_is_help=True)
app.add_typer(ui_app, name="ui")
app.add_typer(admin_app, name="admin")
app.add_typer(owners_app, name="owners")
app.add_typer(agents_app, name="agents")
# The singular, as operators type it (`taskbound agent suspend …`); one listing in help.
app.add_typer(agents_app, name="agent", hidden=True)
app.add_typer(tools_app, name="tools")
app.add_typer(tasks_app, name="tasks")
app.add_typer(credentials_app, name="credentials")
app.add_typer(keys_app, name="keys")
app.add_typer(revocations_app, name="revocations")
app.add_typer(identity_app, name="identity")
app.add_typer(policy_app, name="policy")
app.add_typer(token_app, name="token")
app.add_typer(approvals_app, name="approvals")
app.add_typer(breakglass_app, name="breakglass")
app.add_typer(audit_app, name="audit")
app.add_typer(report_app, name="report")
app.command("apply")(apply)


def _settings(config: str | None, **overrides: object) -> Settings:

    nested: dict[str, dict[str, object]] = {}
    for key, value in overrides.items():
        if value is not None:
            section, _, name = key.partition("__")
            nested.setdefault(section, {})[name] = value
    with handled():
        return load_settings(config, overrides=nested)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (default 8080)."),
    data_dir: Path | None = typer.Option(None, help="Data directory for the SQLite default."),
    config: str | None = ConfigOption,
    demo: bool = typer.Option(False, "--demo", help="Run the demo scenario once the server is up."),
    exit_after_demo: bool = typer.Option(
        False, "--exit-after-demo", help="With --demo: stop the server when the demo ends."
    ),
) -> None:
    """Run the broker (single node: SQLite in the data directory, keys made on first start)."""
    settings = _settings(config, server__host=host, server__port=port, storage__data_dir=data_dir)
    from taskbound.logs import configure_logging
    from taskbound.server import run_server

    # The demo shows the server's refusals (with their reasons) beside its own output.
    if demo:
        configure_logging("warning", "console")
    else:
        configure_logging(settings.logging.level, settings.logging.format)
    with handled():
        ok = asyncio.run(run_server(settings, demo=demo, exit_after_demo=exit_after_demo))
    if not ok:
        raise typer.Exit(1)


@app.command()
def gateway(
    host: str | None = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (default 8080)."),
    config: str | None = ConfigOption,
) -> None:
    """Run only the gateway at /{tool}/… (sharing the broker's database and keys)."""
    settings = _settings(config, server__host=host, server__port=port)
    from taskbound.logs import configure_logging
    from taskbound.server import run_server

    configure_logging(settings.logging.level, settings.logging.format)
    with handled():
        asyncio.run(run_server(settings, broker=False))


@app.command()
def migrate(config: str | None = ConfigOption) -> None:
    """Create or upgrade the database schema (serve does this on start too)."""
    from taskbound.storage.migrate import migrate as run_migrations

    settings = _settings(config)
    with handled():
        asyncio.run(run_migrations(settings.storage_url))
    console.print("[green]database is at the latest schema[/]")


@ui_app.command("set-password")
def ui_set_password(
    owner: str = typer.Argument(..., help="The owner id of the person signing in."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from stdin instead of prompting."
    ),
    data_dir: Path | None = typer.Option(None, help="Data directory for the SQLite default."),
    config: str | None = ConfigOption,
) -> None:
    """Set (or replace) an owner's password for signing in to /ui/ (single-node use;
    OIDC in production). Works on the database directly; the owner's sessions end."""
    from taskbound.core.clock import SystemClock
    from taskbound.core.signin import check_new_password
    from taskbound.storage import open_storage
    from taskbound.ui.auth import Authenticator

    settings = _settings(config, storage__data_dir=data_dir)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        check_new_password(password)
    except ValueError as exc:
        fail(str(exc), code="weak_password", exit_code=2)
    hashed = Authenticator(settings).hash_password(password)

    async def store() -> None:
        storage = await open_storage(settings.storage_url)
        try:
            await storage.set_owner_password(owner, hashed, SystemClock().now())
        finally:
            await storage.close()

    with handled():
        asyncio.run(store())
    console.print(f"[green]password set[/] for owner {owner}; sign in at {settings.public_url}/ui/")


@config_app.command("show")
def config_show(config: str | None = ConfigOption) -> None:
    """Print the effective configuration as JSON, secrets masked."""
    print_json(_settings(config).redacted())


@config_app.command("check")
def config_check(config: str | None = ConfigOption) -> None:
    """Validate the configuration and exit non-zero naming every bad key."""
    settings = _settings(config)
    console.print(f"[green]configuration is valid[/] (public URL {settings.public_url})")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    import httpx

    from taskbound.errors import TaskboundError

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except httpx.HTTPError as exc:
        console.print(f"[bold red]error[/] [dim](unreachable)[/]: cannot reach the server: {exc}")
        sys.exit(1)
    except TaskboundError as exc:
        console.print(f"[bold red]error[/] [dim]({exc.code})[/]: {exc.detail}")
        sys.exit(1)


if __name__ == "__main__":
    main()
