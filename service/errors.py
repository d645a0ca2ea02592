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
