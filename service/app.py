"""The Litestar application: wiring of settings, database, routes and errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox_relay.config import sqlalchemy_url
from service.middleware import RequestContextMiddleware
from service.problems import EXCEPTION_HANDLERS
from service.registry import HandlerRegistry, load_registry
from service.routes import TaskController, list_task_types, live, ready
from service.settings import ServiceSettings

API_VERSION = "1.0.0"


def create_engine(settings: ServiceSettings) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(settings.database_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        # Fail fast when PostgreSQL is unreachable, so a request answers 503
        # instead of hanging until the client gives up.
        pool_timeout=5,
        pool_pre_ping=False,
        connect_args={
            "timeout": 5,
            "command_timeout": 30,
            "server_settings": {"application_name": "outbox-tasks-api"},
        },
    )


def create_app(
    settings: ServiceSettings, registry: HandlerRegistry | None = None
) -> Litestar:
    registry = registry or load_registry(settings.task_handler_modules)

    @asynccontextmanager
    async def database(app: Litestar) -> AsyncIterator[None]:
        engine = create_engine(settings)
        app.state.engine = engine
        try:
            yield
        finally:
            await engine.dispose()

    class MetricsController(PrometheusController):
        path = "/metrics"
        openmetrics_format = False

    prometheus = PrometheusConfig(
        app_name="outbox_tasks_api",
        prefix="outbox_tasks_api",
        group_path=True,
        exclude=["/metrics"],
    )

    return Litestar(
        route_handlers=[
            TaskController,
            list_task_types,
            live,
            ready,
            MetricsController,
        ],
        lifespan=[database],
        state=State({"settings": settings, "registry": registry}),
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[RequestContextMiddleware(), prometheus.middleware],
        request_max_body_size=settings.api_max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Outbox task service",
            version=API_VERSION,
            description=(
                "Submit background tasks that are never lost and never applied "
                "twice. Errors are RFC 9457 problem documents."
            ),
            path="/schema",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        # Logging is configured once by the entry point (structlog); Litestar
        # must not replace the root handler with its own.
        logging_config=None,
        debug=False,
    )
