"""Per-request context: the request id, the trace header and one log line.

The request id comes from ``X-Request-ID`` when the client sends a sane one,
otherwise it is generated; it is echoed in the response, bound to every log
line of the request, and stored on the outbox rows the request writes, so the
consumer's log lines for the task carry it too.
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

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

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
        scope.setdefault("state", {})["request_id"] = request_id
        traceparent = _header(scope, b"traceparent")
        if traceparent and _TRACEPARENT.match(traceparent):
            scope["state"]["traceparent"] = traceparent

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
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
    """The AMQP headers that let the consumer continue this request's context."""
    state = request.scope.get("state", {})
    headers = {REQUEST_ID_HEADER: state.get("request_id", "")}
    if "traceparent" in state:
        headers["traceparent"] = state["traceparent"]
    return headers
