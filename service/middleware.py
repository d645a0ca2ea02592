"""Per-request context: the request id, the trace context and one log line.

The request id comes from ``X-Request-ID`` when the client sends a sane one,
otherwise it is generated; it is echoed in the response, bound to every log
line of the request, and stored on the outbox rows the request writes, so the
consumer's log lines for the task carry it too.

The trace comes from OpenTelemetry's middleware, which runs outside this one
(Litestar puts it around the whole application): it continues the caller's
``traceparent`` or starts a trace, so here a span is always current. Its
trace id is bound to the log lines as ``trace_id``, and its ``traceparent``
goes on the outbox rows beside the request id.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from litestar import Request
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.tracing import current_trace_headers, current_trace_id

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

logger = structlog.get_logger("service.access")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            try:
                return str(value.decode("latin-1"))
            except UnicodeDecodeError:
                return None
    return None


class RequestContextMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp
    ) -> None:
        supplied = _header(scope, b"x-request-id")
        request_id = (
            supplied
            if supplied and _SANE_REQUEST_ID.match(supplied)
            else uuid.uuid4().hex
        )
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["trace_headers"] = current_trace_headers()

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        trace_id = current_trace_id()
        if trace_id is not None:
            structlog.contextvars.bind_contextvars(trace_id=trace_id)
        started = time.perf_counter()
        status = 500

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableScopeHeaders.from_message(message)[REQUEST_ID_HEADER] = (
                    request_id
                )
            await send(message)

        try:
            await next_app(scope, receive, send_with_request_id)
        finally:
            route = scope.get("route_handler")
            if not (route and route.opt.get("skip_access_log")):
                logger.info(
                    "http_request",
                    method=scope.get("method"),
                    path=scope.get("path"),
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
            structlog.contextvars.clear_contextvars()


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
