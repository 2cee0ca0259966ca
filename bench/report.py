"""Benchmark: the posture reports over a large audit trail.

In one run, on SQLite (or PostgreSQL with --postgres URL): a deployment of 200 agents and 20
tools, then audit records of gateway calls added in steps up to --records (default 1M),
spread over 30 days. At each step:

- the usage report and the posture report over the 30 days, through the service
  (`services.reports`), as the CLI and the API call it;
- the raw limit, measured in the same run: the one bare aggregate query the reports
  cannot do without (the usage read's GROUP BY agent, owner, task, tool, action, tier,
  decision over the window), sent straight to the database.

It prints each time, the ratio report / raw aggregate, and how the report time grows with
the number of records (from the first step to the last).

The records are inserted directly, in bulk, with placeholder chain hashes: the reports read
aggregates of the records, never their chain (verification is measured by bench/audit.py).
Bounded in records and time; nothing leaves the machine.

    .venv/bin/python bench/report.py [--records 1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from taskbound.config import load_settings
from taskbound.core.clock import FakeClock
from taskbound.core.model import Scope, TaskFilter, Tier
from taskbound.core.secretbox import generate_kek
from taskbound.service.registry import AgentSpec, OwnerSpec, ToolSpec
from taskbound.service.runtime import open_services
from taskbound.storage import schema as t

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DAYS = 30
TIERS = (Tier.READ, Tier.WRITE, Tier.ADMIN)
PLACEHOLDER = "0" * 64


def _tools() -> list[dict[str, Any]]:
    return [
        {
            "id": f"tool{i:02d}",
            "audience": f"https://gw.example/tool{i:02d}",
            "upstream_url": f"https://tool{i:02d}.example/api",
            "actions": [
                {
                    "name": f"{tier.value}{n}",
                    "tier": tier.value,
                    "method": "GET",
                    "path": f"/{tier.value}/{n}",
                }
                for tier in TIERS
                for n in range(2)
            ],
        }
        for i in range(20)
    ]


async def _deploy(services: Any, rng: random.Random) -> list[tuple[str, str, list[Scope]]]:
    for o in range(10):
        await services.registry.create_owner(OwnerSpec(id=f"owner{o}", contact=f"o{o}@example.com"))
    for spec in _tools():
        await services.registry.create_tool(ToolSpec.model_validate(spec))
    agents = []
    for a in range(200):
        tools = rng.sample(range(20), 3)
        ceiling = [
            Scope(f"tool{i:02d}", tier) for i in tools for tier in TIERS[: rng.randint(1, 3)]
        ]
        spiffe = f"spiffe://bench.example/agents/a{a:03d}"
        owner = f"owner{a % 10}"
        await services.registry.create_agent(
            AgentSpec.model_validate(
                {
                    "spiffe_id": spiffe,
                    "owner": owner,
                    "ceiling": [{"tool": s.tool, "tier": s.tier.value} for s in ceiling],
                }
            )
        )
        agents.append((spiffe, owner, ceiling))
    return agents


def _rows(
    count: int, start_seq: int, agents: list[tuple[str, str, list[Scope]]], rng: random.Random
) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        spiffe, owner, ceiling = agents[rng.randrange(len(agents))]
        # Agents use a part of what they hold: the first scope mostly, others rarely.
        scope = ceiling[0] if rng.random() < 0.8 else ceiling[rng.randrange(len(ceiling))]
        decision = "allow" if rng.random() < 0.9 else rng.choice(("deny", "approval_required"))
        rows.append(
            {
                "seq": start_seq + i,
                "time": NOW - timedelta(seconds=rng.randrange(DAYS * 86400)),
                "event": "gateway.call",
                "decision": decision,
                "code": None if decision == "allow" else "policy_denied",
                "agent": spiffe,
                "owner": owner,
                # 50 tasks per agent over the 30 days: 10,000 tasks, 100 calls per task at 1M.
                "task": f"tsk_{spiffe[-4:]}_{rng.randrange(50)}",
                "tool": scope.tool,
                "action": f"{scope.tier.value}{rng.randrange(2)}",
                "tier": scope.tier.value,
                "policies": [],
                "latency_ms": 1.0,
                "upstream_status": 200 if decision == "allow" else None,
                "prev_hash": PLACEHOLDER,
                "hash": PLACEHOLDER,
            }
        )
    return rows


# The same grouping the usage read does (agent, owner, task, tool, action, tier, decision).
RAW = """
SELECT agent, owner, task, tool, action, tier, decision, count(*), max(time) FROM audit_events
WHERE event = 'gateway.call' AND time >= :since AND time < :until
GROUP BY agent, owner, task, tool, action, tier, decision
"""


async def run(records: int, postgres: str | None) -> None:
    tmp = Path(tempfile.mkdtemp())
    url = postgres or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    settings = load_settings(
        environ={},
        overrides={
            "storage": {"url": url, "data_dir": str(tmp / "data")},
            "keys": {"kek": generate_kek()},
            "policy": {"watch": False},
        },
    )
    services = await open_services(settings, clock=FakeClock(NOW))
    rng = random.Random(7)
    try:
        agents = await _deploy(services, rng)
        sync_url = url.replace("+aiosqlite", "").replace("+psycopg", "+psycopg")
        engine = create_engine(sync_url)
        since, until = NOW - timedelta(days=DAYS), NOW + timedelta(seconds=1)
        steps = sorted({max(1, records // 10), max(1, records // 4), max(1, records // 2), records})
        print(f"taskbound report benchmark: 200 agents, 20 tools, up to {records:,} records")
        print(f"{'records':>10} {'usage s':>9} {'posture s':>10} {'raw agg s':>10} {'ratio':>7}")
        inserted, first = 0, None
        with engine.connect() as conn:  # after the deployment's own records
            head = conn.execute(text("SELECT coalesce(max(seq), 0) FROM audit_events")).scalar()
        for step in steps:
            with engine.begin() as conn:
                while inserted < step:
                    batch = min(50_000, step - inserted)
                    rows = _rows(batch, int(head or 0) + inserted + 1, agents, rng)
                    conn.execute(t.audit_events.insert(), rows)
                    inserted += batch
            with engine.connect() as conn:
                raw_t0 = time.perf_counter()
                raw_rows = conn.execute(
                    text(RAW),
                    {"since": _db_time(since, postgres), "until": _db_time(until, postgres)},
                ).all()
                raw = time.perf_counter() - raw_t0
            t0 = time.perf_counter()
            usage = await services.reports.usage(since, until)
            usage_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            await services.reports.posture(since, until)
            posture_s = time.perf_counter() - t0
            assert usage["totals"]["calls"] == inserted, usage["totals"]
            assert raw_rows
            first = first or (step, usage_s + posture_s)
            print(
                f"{step:>10,} {usage_s:>9.2f} {posture_s:>10.2f} {raw:>10.2f} "
                f"{(usage_s + posture_s) / max(raw, 1e-9):>6.1f}x"
            )
        assert first is not None
        last = usage_s + posture_s
        print(
            f"growth {first[0]:,} -> {inserted:,} records ({inserted / first[0]:.0f}x): "
            f"report time {last / first[1]:.1f}x"
        )
        print(f"report time for {inserted:,} records: {last:.2f} s (usage + posture)")
        _ = await services.storage.list_tasks(TaskFilter(limit=1))
        engine.dispose()
    finally:
        await services.aclose()


def _db_time(when: datetime, postgres: str | None) -> Any:
    # SQLite keeps UTC wall times as text in the storage's own format.
    return when if postgres else when.strftime("%Y-%m-%d %H:%M:%S.%f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--postgres", help="a postgresql+psycopg:// URL (an empty schema)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="EdDSA is deprecated via RFC 9864")
    asyncio.run(run(args.records, args.postgres))


if __name__ == "__main__":
    main()
