"""The moving parts of the chaos test: its plan, the fault injector, the figures.

Everything random comes from one seeded :class:`random.Random`, so a run's
task mix and the order and kind of its faults follow from its seed (the exact
moments still depend on the machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.support.processes import ProcessGroup
from tests.support.proxy import TcpProxy


@dataclass(frozen=True)
class ChaosPlan:
    """How big a run is; the long run reads it from ``CHAOS_*`` variables."""

    tasks: int
    #: Seconds of faults while tasks are submitted; settling comes after.
    seconds: float
    seed: int
    relays: int = 2
    consumers: int = 3
    #: Mean seconds between two faults.
    fault_interval: float = 2.0
    #: Concurrent HTTP clients submitting tasks.
    submitters: int = 4
    #: Seconds the system gets to settle once every fault is repaired.
    settle_seconds: float = 150.0

    @classmethod
    def from_env(cls, **defaults: Any) -> ChaosPlan:
        """``defaults`` overridden by CHAOS_TASKS, CHAOS_SECONDS, CHAOS_SEED,
        CHAOS_RELAYS, CHAOS_CONSUMERS, CHAOS_FAULT_INTERVAL and
        CHAOS_SETTLE_SECONDS where set."""
        values = dict(defaults)
        for name, convert in (
            ("tasks", int),
            ("seconds", float),
            ("seed", int),
            ("relays", int),
            ("consumers", int),
            ("fault_interval", float),
            ("settle_seconds", float),
        ):
            raw = os.environ.get(f"CHAOS_{name.upper()}")
            if raw:
                values[name] = convert(raw)
        return cls(**values)

    @property
    def relay_names(self) -> list[str]:
        return ["relay"] + [f"relay-{i}" for i in range(2, self.relays + 1)]

    @property
    def consumer_names(self) -> list[str]:
        return ["consumer"] + [f"consumer-{i}" for i in range(2, self.consumers + 1)]


def task_body(rng: random.Random, index: int) -> dict[str, Any]:
    """A ``flaky_ledger`` task whose planned failures are drawn from ``rng``.

    About one task in twenty fails all three of its attempts and must end
    FAILED; the others complete, some after one or two failed attempts.
    """
    roll = rng.random()
    if roll < 0.6:
        fail: list[int] = []
    elif roll < 0.85:
        fail = [1]
    elif roll < 0.95:
        fail = [1, 2]
    else:
        fail = [1, 2, 3]
    return {
        "title": f"chaos {index}",
        "type": "flaky_ledger",
        "max_attempts": 3,
        "payload": {
            "amount": index + 1,
            "fail_attempts": fail,
            "delay": round(rng.uniform(0, 0.05), 3),
        },
    }


@dataclass
class FaultInjector:
    """Kills and restarts processes and cuts their broker connections at random.

    Each relay and consumer reaches RabbitMQ through its own proxy in
    ``proxies``; ``env`` holds each process's extra environment, used again
    on every restart.
    """

    group: ProcessGroup
    proxies: dict[str, TcpProxy]
    env: dict[str, dict[str, str]]
    rng: random.Random
    mean_interval: float
    counts: Counter[str] = field(default_factory=Counter)
    _repairs: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        """Inject faults until ``stop`` is set, then repair everything."""
        try:
            while not stop.is_set():
                pause = self.rng.expovariate(1 / self.mean_interval)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                if stop.is_set():
                    break
                await self._one_fault()
        finally:
            await self.repair_all()

    async def _one_fault(self) -> None:
        name = self.rng.choice(sorted(self.proxies))
        kind = self.rng.choice(["kill", "kill", "cut", "outage"])
        if kind == "kill" and name not in self.group.running:
            kind = "cut"  # already down, waiting for its restart
        if kind == "kill":
            self.group.kill(name)
            self.counts[f"kill_{name.split('-')[0]}"] += 1
            self._later(self.rng.uniform(0.2, 2.0), self._restart(name))
        elif kind == "cut":
            await self.proxies[name].cut()
            self.counts["cut"] += 1
        else:
            await self.proxies[name].close()
            self.counts["outage"] += 1
            self._later(self.rng.uniform(1.0, 6.0), self.proxies[name].open())

    async def _restart(self, name: str) -> None:
        self.group.start(name, **self.env[name])

    def _later(self, seconds: float, repair: Any) -> None:
        async def delayed() -> None:
            await asyncio.sleep(seconds)
            await repair

        task = asyncio.create_task(delayed(), name="chaos-repair")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def repair_all(self) -> None:
        """Let pending repairs happen, then make sure all is up and open."""
        if self._repairs:
            await asyncio.gather(*self._repairs)
        for name, proxy in self.proxies.items():
            await proxy.open()
            if name not in self.group.running:
                self.group.start(name, **self.env[name])


@dataclass
class Submissions:
    """What the API answered while tasks were submitted."""

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0


def format_figures(figures: dict[str, Any]) -> str:
    """A plain block of ``name: value`` lines, aligned, for a terminal."""
    width = max(len(name) for name in figures)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in figures.items())
