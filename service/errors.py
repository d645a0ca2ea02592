"""Domain errors of the task service; ``service.problems`` maps them to HTTP."""

from __future__ import annotations


class ServiceError(Exception):
    """Root of the service's exceptions."""


class UnknownTaskTypeError(ServiceError):
    """No handler is registered under this task type."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown task type {name!r}")
        self.name = name


class TaskNotFoundError(ServiceError):
    """No task with this id is visible to the caller."""


class TaskStateConflictError(ServiceError):
    """The task's status does not allow the requested change."""


class InvalidCursorError(ServiceError):
    """A list cursor that this service did not issue, or that was altered."""


class RequestValidationError(ServiceError):
    """A request body that parsed but breaks a rule the schema cannot express."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors))
        self.errors = errors


class AuthenticationError(ServiceError):
    """No API key was presented, or the one presented is not a valid key."""

    def __init__(self, *, presented: bool) -> None:
        super().__init__("invalid API key" if presented else "missing API key")
        self.presented = presented


class MissingScopeError(ServiceError):
    """The caller's key lacks the scope the route requires."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"this API key lacks the scope {scope!r}")
        self.scope = scope


class RateLimitedError(ServiceError):
    """The principal has used up its requests for now."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after} s")
        self.retry_after = retry_after


class IdempotencyKeyReusedError(ServiceError):
    """An ``Idempotency-Key`` sent again with a different request body."""


class InvalidParameterError(ServiceError):
    """A query, path or header parameter that parsed but cannot be used."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
