"""Start the real api, relay and consumer processes for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]

MODULES = {"api": "service", "relay": "outbox_relay", "consumer": "consumer"}


@dataclass
class ProcessGroup:
    """Real processes of one test, each logging JSON lines to its own file."""

    env: dict[str, str]
    log_dir: Path
    api_port: int
    #: Sent with every request of ``api_client()``.
    api_headers: dict[str, str] = field(default_factory=dict)
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _starts: dict[str, int] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def api_client(self) -> httpx.AsyncClient:
        """An HTTP client for the running API, with the test's credentials."""
        return httpx.AsyncClient(
            base_url=self.api_url, headers=self.api_headers, timeout=30
        )

    def start(self, name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start ``name`` (api, relay or consumer, or e.g. consumer-2)."""
        kind = name.split("-")[0]
        self._starts[name] = self._starts.get(name, 0) + 1
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", MODULES[kind]],
            # Run outside the checkout so a developer's .env cannot leak in.
            cwd=self.log_dir,
            env={**self.env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running[name] = process
        return process

    def stop(self, name: str, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.kill()
        process.wait()

    def stop_all(self) -> dict[str, int]:
        return {name: self.stop(name) for name in list(self.running)}

    def log_events(self, name: str) -> list[dict[str, Any]]:
        path = self.log_dir / f"{name}.log"
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    async def wait_ready(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=self.api_url) as client:
            while True:
                if self.running["api"].poll() is not None:
                    raise RuntimeError("api exited:\n" + self.log_text())
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("api not ready:\n" + self.log_text())
                await asyncio.sleep(0.2)


def base_env(
    database_url: str, amqp_url: str, amqp_prefix: str, api_port: int
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "AMQP_", "API_", "RELAY_", "CONSUMER_"))
    }
    env.update(
        DATABASE_URL=database_url,
        AMQP_URL=amqp_url,
        AMQP_PREFIX=amqp_prefix,
        API_HOST="127.0.0.1",
        API_PORT=str(api_port),
        TASK_HANDLER_MODULES="tests.handlers",
        LOG_JSON="true",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        RELAY_POLL_INTERVAL="0.5",
        RETRY_BACKOFF_BASE_SECONDS="0.05",
        RETRY_BACKOFF_MAX_SECONDS="0.5",
    )
    return env
