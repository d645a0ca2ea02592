"""The Litestar application: wiring of settings, database, routes and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from opentelemetry.sdk.trace import TracerProvider

from outbox_relay.errors import SettingsError
from service.auth import ApiAccessMiddleware
from service.database import create_driver_pool, create_engine
from service.key_cache import ApiKeyCache, listening_for_key_changes
from service.middleware import RequestTelemetryMiddleware, add_request_id_header
from service.problems import EXCEPTION_HANDLERS
from service.rate_limit import PrincipalRateLimiter
from service.registry import HandlerRegistry, load_registry
from service.request import ServiceRequest
from service.routes import TaskController, list_task_types, live, metrics, ready
from service.settings import ServiceSettings
from service.tracing import create_tracer_provider, tracing_exported

API_VERSION = "1.0.0"

#: Seconds shut-down waits for the hot path's connections to come back.
POOL_CLOSE_SECONDS = 5


def create_app(
    settings: ServiceSettings,
    registry: HandlerRegistry | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
) -> Litestar:
    """The API. Spans go to ``tracer_provider`` if given (tests pass one that
    keeps them in memory); otherwise to a provider of the app's own, which it
    shuts down with the lifespan."""
    registry = registry or load_registry(settings.task_handler_modules)
    if settings.default_task_type not in registry:
        # Otherwise every request that names no type would be refused as if
        # the client had named an unknown one.
        raise SettingsError(
            f"DEFAULT_TASK_TYPE {settings.default_task_type!r} is not a registered"
            f" task type (registered: {', '.join(registry.names())})"
        )
    own_provider = tracer_provider is None
    provider = tracer_provider or create_tracer_provider(
        "outbox-tasks-api",
        export=tracing_exported(
            settings.otel_enabled, settings.otel_exporter_otlp_endpoint
        ),
    )

    @asynccontextmanager
    async def database(app: Litestar) -> AsyncIterator[None]:
        engine = create_engine(settings)
        app.state.engine = engine
        driver_pool = app.state.driver_pool = await create_driver_pool(settings)
        app.state.rate_limiter = PrincipalRateLimiter.from_settings(settings)
        key_cache = app.state.key_cache = ApiKeyCache(settings.api_key_cache_seconds)
        try:
            async with listening_for_key_changes(key_cache, settings.database_url):
                yield
        finally:
            try:
                # uvicorn let the requests finish first; one it gave up on
                # may still hold a connection, which is then cut.
                await asyncio.wait_for(driver_pool.close(), POOL_CLOSE_SECONDS)
            except TimeoutError:
                driver_pool.terminate()
            await engine.dispose()
            if own_provider:
                # Flushes spans the exporter still holds; blocks briefly.
                await asyncio.to_thread(provider.shutdown)

    # Everything under /api/v1 is behind the key check, so a route added
    # here later cannot be reachable without a key.
    api_v1 = Router(
        "/api/v1",
        route_handlers=[TaskController, list_task_types],
        middleware=[ApiAccessMiddleware()],
        security=[{"apiKey": []}],
    )

    return Litestar(
        route_handlers=[
            api_v1,
            live,
            ready,
            metrics,
        ],
        lifespan=[database],
        state=State({"settings": settings, "registry": registry}),
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[RequestTelemetryMiddleware(provider.get_tracer("service"))],
        before_send=[add_request_id_header],
        request_max_body_size=settings.api_max_body_bytes,
        request_class=ServiceRequest,
        openapi_config=OpenAPIConfig(
            title="Outbox task service",
            version=API_VERSION,
            description=(
                "Submit background tasks that are never lost and never applied "
                "twice. Errors are RFC 9457 problem documents."
            ),
            path="/schema",
            components=Components(
                security_schemes={
                    "apiKey": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description=(
                            "An API key from `python -m service api-keys create NAME`."
                        ),
                    )
                }
            ),
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        # Logging is configured once by the entry point (structlog); Litestar
        # must not replace the root handler with its own.
        logging_config=None,
        debug=False,
    )
