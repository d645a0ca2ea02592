"""``python -m bench``: measure the service beside its raw baselines and peers.

Each group of measurements runs ``--runs`` times; every figure is a ratio of
two numbers taken in the same run, and the table shows the median of those
ratios, so a noisy machine shifts both sides together. The raw numbers of
every run go to ``--out`` as JSON. Nothing here asserts: a missed target is
printed, and the exit status is 0 unless a measurement itself failed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import uvloop

from bench import figures, memory, peers, storage

Numbers = dict[str, float]


@dataclass(frozen=True)
class Sizes:
    seconds: int
    backlog: int
    peer_tasks: int
    published_rows: int
    memory_small: int
    memory_large: int


FULL = Sizes(15, 50_000, 20_000, 5_000_000, 10_000, 200_000)
QUICK = Sizes(3, 2_000, 1_000, storage.QUICK_PUBLISHED_ROWS, 500, 2_000)


@dataclass(frozen=True)
class Target:
    label: str
    #: The figure from one run's numbers (all groups merged).
    figure: Callable[[Numbers], float]
    #: "min" when the figure must be at least ``bound``, "max" at most.
    kind: str
    bound: float
    #: The groups whose numbers the figure needs.
    groups: tuple[str, ...]
    #: How the figure and its inputs are shown.
    detail: Callable[[Numbers], str]

    def met(self, value: float) -> bool:
        return value >= self.bound if self.kind == "min" else value <= self.bound


def _rate(n: Numbers, key: str) -> str:
    return f"{n[key]:,.0f}/s"


TARGETS = [
    Target(
        "API: POST /api/v1/tasks rate at 32 clients ÷ bare endpoint",
        lambda n: n["api_rate"] / n["bare_rate"],
        "min",
        0.75,
        ("api",),
        lambda n: f"{_rate(n, 'api_rate')} vs {_rate(n, 'bare_rate')}",
    ),
    Target(
        "API: p99 at half the bare peak ÷ bare endpoint's p99",
        lambda n: n["api_p99_ms"] / n["bare_p99_ms"],
        "max",
        2.0,
        ("api",),
        lambda n: (
            f"{n['api_p99_ms']:.1f} ms vs {n['bare_p99_ms']:.1f} ms "
            f"at {n['paced_rate']:,.0f}/s"
        ),
    ),
    Target(
        "Relay: draining the backlog ÷ raw confirmed publish",
        lambda n: n["relay_rate"] / n["raw_publish_rate"],
        "min",
        0.75,
        ("stages",),
        lambda n: f"{_rate(n, 'relay_rate')} vs {_rate(n, 'raw_publish_rate')}",
    ),
    Target(
        "Relay: NOTIFY's cost on the API's commit rate",
        lambda n: 1 - n["api_rate_with_notify"] / n["api_rate_without_notify"],
        "max",
        0.10,
        ("api",),
        lambda n: (
            f"{_rate(n, 'api_rate_with_notify')} with, "
            f"{_rate(n, 'api_rate_without_notify')} without"
        ),
    ),
    Target(
        "Consumer: processed ÷ raw consume + inbox commit",
        lambda n: n["consumer_rate"] / n["raw_consume_rate"],
        "min",
        0.70,
        ("stages",),
        lambda n: f"{_rate(n, 'consumer_rate')} vs {_rate(n, 'raw_consume_rate')}",
    ),
    Target(
        "End to end: sustained submit → COMPLETED ÷ raw chain",
        lambda n: n["e2e_rate"] / n["raw_chain_rate"],
        "min",
        0.50,
        ("e2e",),
        lambda n: f"{_rate(n, 'e2e_rate')} vs {_rate(n, 'raw_chain_rate')}",
    ),
    Target(
        "End to end: p50 latency at half the sustained rate ÷ raw chain",
        lambda n: n["e2e_p50_ms"] / n["raw_chain_p50_ms"],
        "max",
        2.0,
        ("e2e",),
        lambda n: f"{n['e2e_p50_ms']:.0f} ms vs {n['raw_chain_p50_ms']:.0f} ms",
    ),
    Target(
        "End to end: p99 latency at half the sustained rate ÷ raw chain",
        lambda n: n["e2e_p99_ms"] / n["raw_chain_p99_ms"],
        "max",
        3.0,
        ("e2e",),
        lambda n: f"{n['e2e_p99_ms']:.0f} ms vs {n['raw_chain_p99_ms']:.0f} ms",
    ),
    Target(
        "End to end: sustained rate ÷ Celery's submit + process",
        lambda n: n["e2e_rate"] / n["celery_rate"],
        "min",
        1.2,
        ("e2e", "peers"),
        lambda n: f"{_rate(n, 'e2e_rate')} vs {_rate(n, 'celery_rate')}",
    ),
    Target(
        "End to end: sustained rate ÷ Procrastinate's submit + process",
        lambda n: n["e2e_rate"] / n["procrastinate_rate"],
        "min",
        3.0,
        ("e2e", "peers"),
        lambda n: f"{_rate(n, 'e2e_rate')} vs {_rate(n, 'procrastinate_rate')}",
    ),
    Target(
        "Relay claim with many published rows: buffers ÷ with none",
        lambda n: n["buffers_with_published"] / n["buffers_after_purge"],
        "max",
        1.0,
        ("storage",),
        lambda n: (
            f"{n['buffers_with_published']:.0f} vs "
            f"{n['buffers_after_purge']:.0f} buffers once purged "
            f"({n['published_rows']:,.0f} published rows; "
            f"{n['buffers_without_published']:.0f} in a table that never held any)"
        ),
    ),
    *(
        Target(
            f"Memory: {name} RSS growth, small → large task count",
            lambda n, name=name: n[f"{name}_rss_growth"],
            "max",
            0.10,
            ("memory",),
            lambda n, name=name: (
                f"{n[f'{name}_rss_small_mb']:.0f} MB → "
                f"{n[f'{name}_rss_large_mb']:.0f} MB"
            ),
        )
        for name in ("api", "relay", "consumer")
    ),
]


def _groups(sizes: Sizes, log_dir: Path) -> dict[str, Callable[[], Awaitable[Numbers]]]:
    async def peer_numbers() -> Numbers:
        return {
            "celery_rate": await peers.celery_rate(sizes.peer_tasks, log_dir),
            "procrastinate_rate": await peers.procrastinate_rate(
                sizes.peer_tasks, log_dir
            ),
        }

    return {
        "api": lambda: figures.api_figures(sizes.seconds, log_dir),
        "stages": lambda: figures.stage_figures(sizes.backlog, log_dir),
        "e2e": lambda: figures.end_to_end_figures(sizes.seconds, log_dir),
        "peers": peer_numbers,
        "storage": lambda: _storage_numbers(sizes.published_rows),
        "memory": lambda: _memory_numbers(
            sizes.memory_small, sizes.memory_large, log_dir
        ),
    }


async def _storage_numbers(published_rows: int) -> Numbers:
    result = await storage.pending_query_buffers(published_rows)
    # Every round with published rows counts: the worst one is the figure.
    worst = max(r["buffers"] for r in result["with_published_rounds"])
    return {
        "published_rows": result["published_rows"],
        "buffers_without_published": result["without_published"]["buffers"],
        "buffers_after_purge": result["purged"]["buffers"],
        "buffers_with_published": worst,
    }


async def _memory_numbers(small: int, large: int, log_dir: Path) -> Numbers:
    result = await memory.rss_growth(small, large, log_dir=log_dir)
    numbers: Numbers = {}
    for name in memory.PROCESSES:
        numbers[f"{name}_rss_growth"] = result["growth"][name] - 1
        numbers[f"{name}_rss_small_mb"] = result["after_small"][name] / 2**20
        numbers[f"{name}_rss_large_mb"] = result["after_large"][name] / 2**20
    return numbers


#: Groups measured once whatever ``--runs`` says: they are deterministic
#: (buffers) or take many minutes (memory).
ONCE = {"storage", "memory"}


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        memory_kb = int(meminfo.read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


@dataclass
class Run:
    groups: list[str] = field(default_factory=list)
    numbers: Numbers = field(default_factory=dict)


def _table(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        usable = [r.numbers for r in runs if set(target.groups) <= set(r.groups)]
        if not usable:
            continue
        values = [target.figure(n) for n in usable]
        value = statistics.median(values)
        middle = usable[values.index(sorted(values)[(len(values) - 1) // 2])]
        sign = "≥" if target.kind == "min" else "≤"
        rows.append(
            {
                "figure": target.label,
                "measured": value,
                "target": f"{sign} {target.bound:g}",
                "met": target.met(value),
                "detail": target.detail(middle),
                "runs": len(values),
            }
        )
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        # e.g. --only peers: every peer figure also needs the e2e group.
        click.echo("no figure has all the groups it needs; raw numbers only")
        return
    width = max(len(r["figure"]) for r in rows)
    click.echo(f"{'figure':<{width}}  {'ratio':>7}  {'target':>7}  met  detail")
    for r in rows:
        click.echo(
            f"{r['figure']:<{width}}  {r['measured']:>7.2f}  {r['target']:>7}  "
            f"{'yes' if r['met'] else 'NO ':<3}  {r['detail']}"
        )


@click.command()
@click.option("--runs", default=3, show_default=True, help="Repeats of each group.")
@click.option("--quick", is_flag=True, help="Small sizes: checks the harness works.")
@click.option(
    "--only",
    default="api,stages,e2e,peers,storage,memory",
    show_default=True,
    help="Comma-separated groups to measure.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench/results/latest.json"),
    show_default=True,
)
def main(runs: int, quick: bool, only: str, out: Path) -> None:
    """Measure every figure beside its baseline and print the ratios."""
    sizes = QUICK if quick else FULL
    log_dir = out.parent / "logs"
    groups = _groups(sizes, log_dir)
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = set(chosen) - set(groups)
    if unknown:
        raise click.BadParameter(f"unknown groups: {', '.join(sorted(unknown))}")

    results = [Run() for _ in range(runs)]
    for index in range(runs):
        for name in chosen:
            if name in ONCE and index > 0:
                continue
            started = time.monotonic()
            click.echo(f"run {index + 1}/{runs}: {name} ...", err=True)
            # The loop the service's processes run on, for the raw baselines
            # measured in this process too.
            numbers = uvloop.run(groups[name]())
            results[index].numbers.update(numbers)
            results[index].groups.append(name)
            click.echo(
                f"  {name} took {time.monotonic() - started:.0f} s: "
                + ", ".join(f"{k}={v:,.1f}" for k, v in numbers.items()),
                err=True,
            )

    rows = _table(results)
    _print_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "sizes": asdict(sizes),
        "table": rows,
        "runs": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    click.echo(f"raw numbers: {out}", err=True)


if __name__ == "__main__":
    main()
