"""Liveness, readiness and Prometheus metrics over HTTP for a worker process.

The relay and the consumer have no API of their own; this small server lets
an orchestrator probe them and Prometheus scrape them. It runs inside the
worker's event loop and leaves signal handling to the worker, which stops it
through the same shutdown event as everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator
from typing import Any

import uvicorn
from litestar import Litestar, MediaType, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

#: Answers whether the worker can do its job right now (dependencies reachable).
ReadinessCheck = Callable[[], bool]


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The worker owns SIGTERM/SIGINT; uvicorn must not take them over.
        yield


def health_app(name: str, is_ready: ReadinessCheck) -> Litestar:
    @get("/health/live", media_type=MediaType.JSON)
    async def live() -> dict[str, str]:
        return {"status": "ok", "process": name}

    @get("/health/ready", media_type=MediaType.JSON)
    async def ready() -> Response[dict[str, str]]:
        if is_ready():
            return Response({"status": "ok", "process": name})
        return Response({"status": "unavailable", "process": name}, status_code=503)

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        # As a header: a text/* media type would get a second charset
        # appended, which Prometheus refuses.
        return Response(
            generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    # logging_config=None: Litestar would otherwise replace the root handler
    # that configure_logging installed, and the process would stop logging JSON.
    return Litestar([live, ready, metrics], openapi_config=None, logging_config=None)


async def serve_health(
    name: str, host: str, port: int, is_ready: ReadinessCheck, stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set; port 0 turns the server off."""
    if port == 0:
        await stop.wait()
        return

    config: Any = uvicorn.Config(
        health_app(name, is_ready),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = _QuietServer(config)
    serving = asyncio.create_task(server.serve(), name=f"{name}-health-server")
    stopping = asyncio.create_task(stop.wait(), name=f"{name}-health-stop")
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await serving
