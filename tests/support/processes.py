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
    #: Sent with every request of ``api_client()``; holds an admin key once
    #: the first client was made (see ``authorize``).
    api_headers: dict[str, str] = field(default_factory=dict)
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _starts: dict[str, int] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def api_client(self) -> httpx.AsyncClient:
        """An HTTP client for the running API, with the test's credentials."""
        if "Authorization" not in self.api_headers:
            self.authorize()
        return httpx.AsyncClient(
            base_url=self.api_url, headers=self.api_headers, timeout=30
        )

    def create_api_key(self, name: str, *scopes: str) -> str:
        """A new key from the real CLI, in the test's database."""
        command = [sys.executable, "-m", "service", "api-keys", "create", name]
        for scope in scopes:
            command += ["--scope", scope]
        done = subprocess.run(
            command,
            cwd=self.log_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"api-keys create failed:\n{done.stderr}")
        return done.stdout.strip()

    def authorize(self, name: str = "e2e", *scopes: str) -> None:
        """Send a key of principal ``name`` (admin by default) from now on."""
        key = self.create_api_key(name, *(scopes or ("admin",)))
        self.api_headers["Authorization"] = f"Bearer {key}"

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
        if not key.startswith(
            ("DATABASE_", "AMQP_", "API_", "RELAY_", "CONSUMER_", "RATE_LIMIT_")
        )
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
        # Tests send bursts far beyond any sane per-principal rate.
        API_RATE_LIMIT_PER_MINUTE="0",
    )
    return env
