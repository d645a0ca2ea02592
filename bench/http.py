"""HTTP load through established generators: wrk for peak rate, hey for a
fixed rate.

wrk keeps every connection busy and reports what the server sustains; hey
paces each worker to a fixed rate, so latency is measured below saturation
(each worker still waits for its previous answer, so a stalled server lowers
the offered rate instead of queueing requests: keep the rate well below peak).
Both post ``bench.env.TASK_BODY``; a non-2xx answer or a socket error is
counted and makes the run fail, because a rate of refusals means nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.env import TASK_BODY, percentile

WRK_SCRIPT = Path(__file__).with_name("post_task.lua")


class LoadError(RuntimeError):
    """The load generator saw errors or refusals."""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def peak(url: str, *, connections: int, seconds: int, auth: str = "") -> LoadResult:
    """Requests per second wrk gets with ``connections`` busy connections."""
    done = subprocess.run(
        [
            "wrk",
            f"--connections={connections}",
            "--threads=2",
            f"--duration={seconds}s",
            "--timeout=10s",
            f"--script={WRK_SCRIPT}",
            url,
        ],
        env={**os.environ, "BENCH_BODY": TASK_BODY.decode(), "BENCH_AUTH": auth},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    line = next(
        (x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None
    )
    if line is None:
        raise LoadError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    if result["errors"] or result["non2xx"]:
        raise LoadError(f"wrk saw failures: {result}")
    return LoadResult(
        requests=result["requests"],
        seconds=result["duration_us"] / 1e6,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
    )


def paced(
    url: str, *, rate: float, seconds: int, workers: int = 16, auth: str = ""
) -> LoadResult:
    """Latency of requests offered at ``rate`` per second by hey."""
    command = [
        "hey",
        "-z",
        f"{seconds}s",
        "-c",
        str(workers),
        "-q",
        f"{rate / workers:.3f}",
        "-m",
        "POST",
        "-T",
        "application/json",
        "-d",
        TASK_BODY.decode(),
        "-o",
        "csv",
    ]
    if auth:
        command += ["-H", f"Authorization: {auth}"]
    done = subprocess.run(
        [*command, url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if not rows:
        raise LoadError(f"hey printed no requests:\n{done.stderr}")
    failed = [row for row in rows if not row["status-code"].startswith("2")]
    if failed:
        raise LoadError(f"hey saw {len(failed)} failures, e.g. {failed[0]}")
    latencies = [float(row["response-time"]) * 1000 for row in rows]
    return LoadResult(
        requests=len(rows),
        seconds=float(seconds),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )
