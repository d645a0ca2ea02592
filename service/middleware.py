"""Per-request telemetry: the request id, the trace span, metrics and one log line.

One middleware does all four, so a request pays for one wrapper around
``send`` instead of one per concern. It runs once Litestar has routed the
request (app-level middleware is part of each route), so the route's path
template names the span and labels the metrics.

- **Request id.** From ``X-Request-ID`` when the client sends a sane one,
  otherwise generated; echoed in the response, bound to every log line of
  the request, and stored on the outbox rows the request writes, so the
  consumer's log lines for the task carry it too.
- **Trace.** A server span continues the caller's ``traceparent`` or starts a
  trace. Its trace id is bound to the log lines as ``trace_id``, and its
  ``traceparent`` goes on the outbox rows beside the request id. Probes,
  ``/metrics`` and the schema are not traced.
- **Metrics.** Requests, errors, durations and requests in progress per
  method and route, through ``prometheus_client``; ``/metrics`` itself is not
  counted. The names are those of ``API_METRICS_PREFIX`` (see the README).
- **Access log.** One ``http_request`` line per request, unless the route sets
  ``opt["skip_access_log"]`` (the probes).

An error raised by middleware inside this one (the key check, the rate limit)
is answered here, through the same problem handlers as a route's errors, so
its status is the one logged and counted and its response carries the request
id. The ``X-Request-ID`` header itself goes on in :func:`add_request_id_header`,
a before-send hook, so that a request no route matches (404, 405), which
never reaches route middleware, gets one too, and a log line.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import structlog
from litestar import Request
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import Counter, Gauge, Histogram

from service.problems import send_problem
from service.tracing import current_trace_headers, extract_context

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: Start of every API metric's name.
API_METRICS_PREFIX = "outbox_tasks_api"

#: Paths (by prefix) that get no span: probes, metrics and the API's schema.
UNTRACED_PREFIXES = ("/health/", "/metrics", "/schema")

REQUESTS = Counter(
    f"{API_METRICS_PREFIX}_requests_total",
    "HTTP requests answered.",
    ["method", "path", "status_code"],
)
ERRORS = Counter(
    f"{API_METRICS_PREFIX}_requests_error_total",
    "HTTP requests answered with a 5xx status.",
    ["method", "path", "status_code"],
)
DURATION = Histogram(
    f"{API_METRICS_PREFIX}_request_duration_seconds",
    "Time from a request's arrival until its response was sent, in seconds.",
    ["method", "path", "status_code"],
)
IN_PROGRESS = Gauge(
    f"{API_METRICS_PREFIX}_requests_in_progress",
    "HTTP requests being handled now.",
    ["method", "path"],
)

logger = structlog.get_logger("service.access")


# The metrics' children by label values, looked up once: ``labels()`` takes a
# lock and checks its arguments on every call. Methods, route templates and
# statuses are few; the bound only guards against a path without a template.
@functools.lru_cache(maxsize=1024)
def _in_progress(method: str, path: str) -> Gauge:
    return IN_PROGRESS.labels(method, path)


@functools.lru_cache(maxsize=1024)
def _answered(method: str, path: str, status: int) -> tuple[Counter, Histogram]:
    code = str(status)
    return REQUESTS.labels(method, path, code), DURATION.labels(method, path, code)


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            supplied = value.decode("latin-1")
            if _SANE_REQUEST_ID.match(supplied):
                return supplied
            break
    return uuid.uuid4().hex


def _trace_carrier(scope: Scope) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        if key in (b"traceparent", b"tracestate"):
            carrier[key.decode("latin-1")] = value.decode("latin-1")
    return carrier


class RequestTelemetryMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp
    ) -> None:
        started = time.perf_counter()
        method: str = scope["method"]  # type: ignore[typeddict-item]
        path: str = scope.get("path_template") or scope["path"]
        route = scope.get("route_handler")
        request_id = _request_id(scope)
        status = 500
        started_response = False

        async def send_noting_status(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["trace_headers"] = {}
        counted = path != "/metrics"
        if counted:
            in_progress = _in_progress(method, path)
            in_progress.inc()

        traced = not scope["path"].startswith(UNTRACED_PREFIXES)
        with self._span(scope, method, path) if traced else nullcontext() as span:
            if span is not None:
                state["trace_headers"] = current_trace_headers()
                structlog.contextvars.bind_contextvars(
                    trace_id=trace.format_trace_id(span.get_span_context().trace_id)
                )
            try:
                try:
                    await next_app(scope, receive, send_noting_status)
                except Exception as exc:
                    if started_response:
                        raise
                    await send_problem(scope, receive, send_noting_status, exc)
            finally:
                duration = time.perf_counter() - started
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                if counted:
                    in_progress.dec()
                    requests, durations = _answered(method, path, status)
                    requests.inc()
                    durations.observe(duration)
                    if status >= 500:
                        ERRORS.labels(method, path, str(status)).inc()
                if not (route and route.opt.get("skip_access_log")):
                    logger.info(
                        "http_request",
                        method=method,
                        path=scope["path"],
                        status=status,
                        duration_ms=round(duration * 1000, 2),
                    )
                structlog.contextvars.clear_contextvars()

    def _span(
        self, scope: Scope, method: str, path: str
    ) -> AbstractContextManager[Span]:
        """A server span for the request, continuing the caller's trace."""
        return self._tracer.start_as_current_span(
            f"{method} {path}",
            context=extract_context(_trace_carrier(scope)),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": path,
                "url.path": scope["path"],
            },
        )


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """Before-send hook: ``X-Request-ID`` on every response.

    The id is the one :class:`RequestTelemetryMiddleware` gave the request;
    a request no route matched never reached it, so it gets one here, and
    its access log line with it.
    """
    # An http.response.start message belongs to an HTTP request.
    if message["type"] != "http.response.start":
        return
    state = scope.setdefault("state", {})
    request_id = state.get("request_id")
    if request_id is None:
        request_id = state["request_id"] = _request_id(scope)
        logger.info(
            "http_request",
            request_id=request_id,
            method=scope.get("method"),
            path=scope["path"],
            status=message["status"],
        )
    # Raw headers, so the response's own stay as they were.
    message["headers"] = [
        *message.get("headers", ()),
        (b"x-request-id", request_id.encode("latin-1")),
    ]


def outbox_headers(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The AMQP headers that let the consumer continue this request's context.

    The request id, and the ``traceparent`` (plus ``tracestate``, if the
    caller sent one) of the request's span.
    """
    state = request.scope.get("state", {})
    return {
        REQUEST_ID_HEADER: state.get("request_id", ""),
        **state.get("trace_headers", {}),
    }
