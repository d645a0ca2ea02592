"""Every error the API can answer, as an RFC 9457 problem response.

This is the one place where exceptions become HTTP statuses: Litestar's own
(routing, body parsing, validation), the service's domain errors and database
outages. Anything else is a 500 that is logged with its traceback and shows
the client nothing internal.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    SerializationException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import ClientException
from litestar.openapi import ResponseSpec
from litestar.serialization import encode_json
from litestar.types import Receive, Scope, Send
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.errors import (
    AuthenticationError,
    IdempotencyKeyReusedError,
    InvalidCursorError,
    InvalidParameterError,
    MissingScopeError,
    RateLimitedError,
    RequestValidationError,
    ServiceError,
    TaskNotFoundError,
    TaskStateConflictError,
    UnknownTaskTypeError,
)
from service.schemas import FieldError, Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Problem types are relative URIs; the README lists what each means.
PROBLEM_BASE = "/problems/"

logger = structlog.get_logger(__name__)

_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def problem_response(
    status: int,
    slug: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Any]:
    problem = Problem(
        type=PROBLEM_BASE + slug,
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        errors=errors,
    )
    return Response(
        content=encode_json(problem),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def field_error_from_msgspec(prefix: str, exc: msgspec.ValidationError) -> FieldError:
    """Turn msgspec's "Expected `int` - at `$.a.b`" into field `prefix.a.b`."""
    match = _MSGSPEC_PATH.match(str(exc))
    message, path = (match["message"], match["path"] or "") if match else (str(exc), "")
    return FieldError(field=prefix + path, message=message)


def _validation(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[Any]:
    raw = exc.extra if isinstance(exc.extra, list) else []
    errors = [
        FieldError(field=str(item.get("key", "")), message=str(item.get("message", "")))
        for item in raw
        if isinstance(item, dict)
    ]
    in_body = any(isinstance(i, dict) and i.get("source") == "body" for i in raw)
    length = request.headers.get("content-length")
    chunked = "transfer-encoding" in request.headers
    if in_body and (length == "0" or (length is None and not chunked)):
        return problem_response(
            400, "malformed-body", "The body is empty; a JSON object is expected."
        )
    if in_body:
        # Litestar names the whole body "data"; clients know it as the body.
        for error in errors:
            if error.field == "data":
                error.field = "body"
        return problem_response(
            422, "validation-error", "The request body is not valid.", errors=errors
        )
    return problem_response(
        400,
        "invalid-parameter",
        "A path, query or header parameter is not valid.",
        errors=errors,
    )


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ClientException) and isinstance(
        exc.__cause__, SerializationException
    ):
        return problem_response(400, "malformed-body", str(exc.detail))

    slug = {
        400: "bad-request",
        401: "unauthorized",
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        413: "body-too-large",
        415: "unsupported-media-type",
        429: "rate-limited",
    }.get(exc.status_code, "http-error")
    detail = exc.detail or HTTPStatus(exc.status_code).phrase
    return problem_response(exc.status_code, slug, detail, headers=exc.headers)


def _service(request: Request[Any, Any, Any], exc: ServiceError) -> Response[Any]:
    if isinstance(exc, AuthenticationError):
        # RFC 6750: say which scheme is expected, and whether the key sent
        # (if any) was the trouble; never echo the key itself.
        challenge = 'Bearer error="invalid_token"' if exc.presented else "Bearer"
        return problem_response(
            401,
            "unauthorized",
            "Send a valid API key as `Authorization: Bearer <key>`."
            if not exc.presented
            else "The API key is not valid, or was revoked.",
            headers={"WWW-Authenticate": challenge},
        )
    if isinstance(exc, MissingScopeError):
        return problem_response(403, "forbidden", str(exc))
    if isinstance(exc, RateLimitedError):
        return problem_response(
            429,
            "rate-limited",
            "Too many requests from this principal; retry after the "
            "Retry-After header's seconds.",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, IdempotencyKeyReusedError):
        return problem_response(
            422,
            "idempotency-key-reused",
            str(exc),
            errors=[FieldError(field="Idempotency-Key", message=str(exc))],
        )
    if isinstance(exc, InvalidParameterError):
        return problem_response(
            400,
            "invalid-parameter",
            "A path, query or header parameter is not valid.",
            errors=[FieldError(field=exc.field, message=exc.message)],
        )
    if isinstance(exc, TaskNotFoundError):
        return problem_response(404, "task-not-found", "No such task.")
    if isinstance(exc, TaskStateConflictError):
        return problem_response(409, "task-state-conflict", str(exc))
    if isinstance(exc, InvalidCursorError):
        return problem_response(
            400, "invalid-cursor", "The cursor is not one this service issued."
        )
    if isinstance(exc, UnknownTaskTypeError):
        return problem_response(
            422,
            "validation-error",
            "The request body is not valid.",
            errors=[FieldError(field="type", message=str(exc))],
        )
    if isinstance(exc, RequestValidationError):
        return problem_response(
            422,
            "validation-error",
            "The request body is not valid.",
            errors=[FieldError(field=f, message=m) for f, m in exc.errors],
        )
    return _unexpected(request, exc)


def _database_unavailable(
    request: Request[Any, Any, Any], exc: Exception
) -> Response[Any]:
    logger.warning("database_unavailable", error=type(exc).__name__)
    return problem_response(
        503,
        "database-unavailable",
        "The database is unreachable; nothing was changed. Try again shortly.",
        headers={"Retry-After": "5"},
    )


#: SQLSTATE classes meaning "the database cannot serve us right now": connection
#: exceptions, insufficient resources, operator intervention (shutdown,
#: recovery) and a database that does not exist (yet).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57", "3D000")


def _dbapi(request: Request[Any, Any, Any], exc: DBAPIError) -> Response[Any]:
    sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
    if (
        exc.connection_invalidated
        or isinstance(exc, InterfaceError | OperationalError)
        or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    ):
        return _database_unavailable(request, exc)
    return _unexpected(request, exc)


def _driver(
    request: Request[Any, Any, Any], exc: asyncpg.PostgresError
) -> Response[Any]:
    """An error of a statement run on the driver's connection directly."""
    if str(getattr(exc, "sqlstate", "") or "").startswith(_UNAVAILABLE_SQLSTATES):
        return _database_unavailable(request, exc)
    return _unexpected(request, exc)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.exception("request_failed", path=request.url.path)
    return problem_response(500, "internal-error", "An unexpected error occurred.")


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    ValidationException: _validation,
    HTTPException: _http,
    ServiceError: _service,
    DBAPIError: _dbapi,
    asyncpg.PostgresError: _driver,
    # The driver's connection broke mid-statement (the server went away).
    asyncpg.InterfaceError: _database_unavailable,
    OSError: _database_unavailable,
    TimeoutError: _database_unavailable,
    # Every pooled connection stayed busy for pool_timeout: overloaded.
    PoolTimeoutError: _database_unavailable,
    Exception: _unexpected,
}


def handler_for(exc: Exception) -> Any:
    """The handler :data:`EXCEPTION_HANDLERS` names for ``exc``: its class's,
    or the nearest base class's."""
    for cls in type(exc).__mro__:
        if cls in EXCEPTION_HANDLERS:
            return EXCEPTION_HANDLERS[cls]
    return _unexpected


async def send_problem(
    scope: Scope, receive: Receive, send: Send, exc: Exception
) -> None:
    """Answer with ``exc``'s problem response, as Litestar's own exception
    handling would, but through ``send``: for middleware whose errors would
    otherwise be answered outside the middleware that wraps them."""
    request: Request[Any, Any, Any] = Request(scope, receive)
    response = handler_for(exc)(request, exc)
    await response.to_asgi_response(app=None, request=request)(scope, receive, send)


_DESCRIPTIONS = {
    400: "Malformed JSON, or a bad path, query or header parameter.",
    401: "Missing or invalid API key.",
    403: "The API key lacks the scope this route needs.",
    404: "No such resource (or it belongs to another principal).",
    409: "The resource's state does not allow this change.",
    413: "The request body is larger than the limit.",
    422: "The body is valid JSON but breaks the schema; see `errors`.",
    429: "Too many requests; see the Retry-After header.",
    503: "The database is unreachable; nothing was changed.",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem responses a route can give.

    Every route may also answer 500, which is documented everywhere.
    """
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            media_type=PROBLEM_MEDIA_TYPE,
        )
        for status in (*statuses, 500)
    }
