"""What every CLI command shares: the admin API client, JSON or rich output, and errors
printed as one clear line with the server's stable code."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from taskbound.errors import TaskboundError

console = Console()
err_console = Console(stderr=True)

UrlOption = typer.Option(
    "http://127.0.0.1:8080",
    "--url",
    envvar="TASKBOUND_URL",
    help="The taskbound server's base URL.",
)
TokenOption = typer.Option(
    None,
    "--token",
    envvar="TASKBOUND_ADMIN_TOKEN",
    help="Admin token (from `taskbound admin init`).",
    show_default=False,
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")


def fail(message: str, *, code: str = "error", exit_code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error[/] [dim]({code})[/]: {message}")
    raise typer.Exit(exit_code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn expected failures into one line on stderr and a non-zero exit."""
    try:
        yield
    except TaskboundError as exc:
        fail(exc.detail, code=exc.code)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the server: {exc}", code="unreachable")


class AdminClient:
    """A thin client of the admin API; raises on any problem response."""

    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            fail(
                "an admin token is required: pass --token or set TASKBOUND_ADMIN_TOKEN "
                "(create one with `taskbound admin init`)",
                code="invalid_admin_token",
                exit_code=2,
            )
        self._base = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with httpx.Client(base_url=self._base, headers=self._headers, timeout=30.0) as http:
            response = http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            code = body.get("code") or body.get("error") or f"http_{response.status_code}"
            detail = body.get("detail") or body.get("error_description") or response.reason_phrase
            fail(str(detail), code=str(code))
        if not response.content:
            return {}
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold cyan")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def load_document(path: str) -> Any:
    """Read a YAML or JSON file (``-`` for stdin)."""
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", code="invalid_request", exit_code=2)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML/JSON: {exc}", code="invalid_request", exit_code=2)
