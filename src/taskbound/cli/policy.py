"""`taskbound policy`: validate, test, explain and diff policy sets; reload a server's."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer

from taskbound.cli.common import (
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    console,
    fail,
    handled,
    print_json,
    print_table,
)
from taskbound.core.model import Tool
from taskbound.core.policy import CompiledPolicies, Decision, PolicyInvalid, PolicySource
from taskbound.service.policy_cases import CaseResult

policy_app = typer.Typer(
    help="Policy-as-code: validate, test, explain and diff Cedar policy sets.",
    no_args_is_help=True,
)

PoliciesOption = typer.Option(
    None,
    "--policies",
    "-p",
    help="Policy directory (default: the configured one, else the default pack).",
)
RegistryOption = typer.Option(
    None, "--registry", "-r", help="Registry document (YAML) to build the schema from, offline."
)
ConfigOption = typer.Option(
    None, "--config", "-c", envvar="TASKBOUND_CONFIG", help="TOML configuration file."
)


def _sources(directory: Path | None, config: str | None) -> tuple[Path, list[PolicySource]]:
    from taskbound.service.policy import default_policy_dir, read_policy_dir

    if directory is None:
        from taskbound.config import load_settings

        directory = load_settings(config).policy.dir or default_policy_dir()
    return directory, read_policy_dir(directory)


def _problems(exc: PolicyInvalid) -> None:
    console.print(f"[bold red]policy set is not valid[/] ({len(exc.problems) or 1} problem(s)):")
    for problem in exc.problems or ():
        console.print(f"  [red]✗[/] {problem}")
    if not exc.problems:
        console.print(f"  [red]✗[/] {exc.detail}")
    raise typer.Exit(1)


@policy_app.command("validate")
def validate(
    policies: Path | None = PoliciesOption,
    registry: Path | None = RegistryOption,
    config: str | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Check every policy file against the schema generated from the registry (a registry
    document with --registry, else the configured database). Exit 1 naming file and line
    of every problem."""
    from taskbound.core.cedar_schema import build_schema
    from taskbound.core.policy import compile_policies

    with handled():
        directory, sources = _sources(policies, config)
        tools = _registry_tools(registry, config)
        try:
            compiled = compile_policies(sources, build_schema(tools))
        except PolicyInvalid as exc:
            if as_json:
                print_json(
                    {"valid": False, "problems": [str(p) for p in exc.problems] or [exc.detail]}
                )
                raise typer.Exit(1) from None
            _problems(exc)
    if as_json:
        return print_json(
            {"valid": True, "version": compiled.version, "policies": len(compiled.policies)}
        )
    console.print(
        f"[green]valid[/]: {len(compiled.policies)} policies in {len(sources)} files "
        f"from {directory} ({compiled.version[:19]}…)"
    )


def _registry_tools(registry: Path | None, config: str | None) -> list[Tool]:
    from taskbound.service.policy_cases import EPOCH, load_registry
    from taskbound.service.registry import tool_from_spec

    if registry is not None:
        return [tool_from_spec(t, EPOCH, EPOCH) for t in load_registry(registry).tools]
    from taskbound.config import load_settings
    from taskbound.storage import open_storage

    async def read() -> list[Tool]:
        storage = await open_storage(load_settings(config).storage_url)
        try:
            return await storage.list_tools()
        finally:
            await storage.close()

    return asyncio.run(read())


@policy_app.command("test")
def run_tests(
    cases: Path = typer.Argument(..., help="A case file or a directory of case files (YAML)."),
    policies: Path | None = PoliciesOption,
    registry: Path | None = RegistryOption,
    config: str | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Run policy test cases (request + expected decision + expected deciding policies).
    Exit 1 when any case fails; list the policies no case exercises."""
    from taskbound.service.policy_cases import load_suite, run_suite

    with handled():
        _, sources = _sources(policies, config)
        suite = load_suite(cases, registry)
        try:
            report = run_suite(suite, sources)
        except PolicyInvalid as exc:
            _problems(exc)
    if as_json:
        print_json(
            {
                "version": report.version,
                "passed": len(report.results) - len(report.failed),
                "failed": [_result_json(r) for r in report.failed],
                "uncovered": list(report.uncovered),
            }
        )
    else:
        for r in report.results:
            mark = "[green]✓[/]" if r.passed else "[bold red]✗[/]"
            console.print(f"{mark} {r.case.file}: {r.case.spec.name}")
            if not r.passed:
                spec = r.case.spec
                console.print(
                    f"    expected [bold]{spec.expect.value}[/]"
                    + (f" by {sorted(spec.determining)}" if spec.determining is not None else "")
                    + f", got [bold]{r.decision.outcome.value}[/] by {list(r.decision.determining)}"
                )
                for err in r.decision.errors:
                    console.print(f"    [yellow]error[/] {err}")
        passed = len(report.results) - len(report.failed)
        colour = "green" if not report.failed else "red"
        console.print(f"\n[{colour}]{passed} passed, {len(report.failed)} failed[/]")
        if report.uncovered:
            console.print(f"[yellow]policies no case exercises:[/] {', '.join(report.uncovered)}")
    if report.failed:
        raise typer.Exit(1)


def _result_json(r: CaseResult) -> dict[str, Any]:
    return {
        "file": r.case.file,
        "name": r.case.spec.name,
        "expected": r.case.spec.expect.value,
        "got": r.decision.outcome.value,
        "determining": list(r.decision.determining),
        "errors": list(r.decision.errors),
    }


@policy_app.command("explain")
def explain(
    cases: Path = typer.Argument(..., help="A case file (YAML) holding the request(s)."),
    name: str | None = typer.Option(None, "--name", help="Only the case with this name."),
    policies: Path | None = PoliciesOption,
    registry: Path | None = RegistryOption,
    config: str | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Why a request is allowed or denied: the decision, the deciding policies with their
    file, line and text, and any evaluation errors."""
    from taskbound.service.policy_cases import compile_for, load_suite, run_case

    with handled():
        _, sources = _sources(policies, config)
        suite = load_suite(cases, registry)
        try:
            compiled, base = compile_for(suite.registry, sources)
        except PolicyInvalid as exc:
            _problems(exc)
        chosen = [c for c in suite.cases if name is None or c.spec.name == name]
        if not chosen:
            fail(f"no case named {name!r}", code="not_found")
        out = []
        for case in chosen:
            decision = run_case(compiled, base, suite.registry, case)
            out.append((case, decision))
    if as_json:
        return print_json(
            [
                {
                    "name": c.spec.name,
                    "outcome": d.outcome.value,
                    "policy_version": d.policy_version,
                    "determining": [
                        {
                            "id": pid,
                            "file": compiled.policies[pid].file,
                            "line": compiled.policies[pid].line,
                        }
                        for pid in d.determining
                    ],
                    "errors": list(d.errors),
                }
                for c, d in out
            ]
        )
    for case, decision in out:
        _explain_one(case.spec.name, case.spec.action, decision, compiled)


def _explain_one(name: str, action: str, decision: Decision, compiled: CompiledPolicies) -> None:
    colour = {"allow": "green", "deny": "red", "approval_required": "yellow"}[
        decision.outcome.value
    ]
    console.print(f"\n[bold]{name}[/] ({action}): [{colour}]{decision.outcome.value}[/]")
    if not decision.determining and not decision.errors:
        console.print("  no policy permits it (default deny)")
    for pid in decision.determining:
        info = compiled.policies[pid]
        console.print(f"  [cyan]{info.effect}[/] {pid}  [dim]{info.file}:{info.line}[/]")
        for line in info.text.strip().splitlines():
            console.print(f"    [dim]{line}[/]", markup=False, highlight=False)
    for err in decision.errors:
        console.print(f"  [yellow]error[/] {err}")
    console.print(f"  [dim]policy set {decision.policy_version}[/]")


@policy_app.command("diff")
def diff(
    old: Path = typer.Argument(..., help="The current policy directory."),
    new: Path = typer.Argument(..., help="The proposed policy directory."),
    cases: Path = typer.Option(..., "--cases", help="Case file or directory to decide with both."),
    registry: Path | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Which test decisions change between two policy sets (for review before a reload)."""
    from taskbound.service.policy import read_policy_dir
    from taskbound.service.policy_cases import compile_for, load_suite, run_case

    with handled():
        suite = load_suite(cases, registry)
        try:
            before = compile_for(suite.registry, read_policy_dir(old))
            after = compile_for(suite.registry, read_policy_dir(new))
        except PolicyInvalid as exc:
            _problems(exc)
        changes = []
        for case in suite.cases:
            a = run_case(*before, suite.registry, case)
            b = run_case(*after, suite.registry, case)
            if (a.outcome, sorted(a.determining)) != (b.outcome, sorted(b.determining)):
                changes.append((case, a, b))
    if as_json:
        return print_json(
            [
                {
                    "name": c.spec.name,
                    "before": {"outcome": a.outcome.value, "determining": list(a.determining)},
                    "after": {"outcome": b.outcome.value, "determining": list(b.determining)},
                }
                for c, a, b in changes
            ]
        )
    if not changes:
        console.print(f"[green]no decision changes[/] across {len(suite.cases)} cases")
        return
    print_table(
        f"{len(changes)} of {len(suite.cases)} decisions change",
        ["case", "before", "after"],
        [
            (
                c.spec.name,
                f"{a.outcome.value} {list(a.determining)}",
                f"{b.outcome.value} {list(b.determining)}",
            )
            for c, a, b in changes
        ],
    )


@policy_app.command("reload")
def reload(url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption) -> None:
    """Ask a running server to reload its policy files (it keeps the last good set if they
    fail, and says why)."""
    import httpx

    if not token:
        fail(
            "an admin token is required (--token or TASKBOUND_ADMIN_TOKEN)",
            code="invalid_admin_token",
            exit_code=2,
        )
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as http:
            r = http.post("/v1/admin/policy/reload", headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        fail(f"cannot reach the server: {exc}", code="unreachable")
    if r.status_code not in (200, 422):
        AdminClient(url, token).post("/v1/admin/policy/reload")  # prints the problem, exits
    body = r.json()
    if as_json:
        print_json(body)
    elif body["ok"]:
        verb = "reloaded" if body["changed"] else "unchanged"
        console.print(f"[green]{verb}[/] policy set {body['version']}")
    else:
        console.print("[bold red]reload refused[/]; the last good set stays in force:")
        for p in body["problems"]:
            console.print(f"  [red]✗[/] {p}")
    if not body["ok"]:
        raise typer.Exit(1)


@policy_app.command("status")
def status(url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption) -> None:
    """The policy set a running server decides with."""
    data = AdminClient(url, token).get("/v1/admin/policy")
    if as_json:
        return print_json(data)
    console.print(
        f"policy set [bold]{data['version']}[/] from {data['directory']}, "
        f"loaded {data['loaded_at']}"
    )
    print_table(
        "Policies",
        ["id", "effect", "where"],
        [(p["id"], p["effect"], f"{p['file']}:{p['line']}") for p in data["policies"]],
    )
    for problem in data["last_problems"]:
        console.print(f"[red]last reload problem[/] {problem}")
