"""Task types: the name a client submits, its payload schema and its handler.

One registry serves both sides. The API validates a submitted payload against
the type's msgspec struct (so a bad payload is a 422, not a failure later) and
publishes the schemas; the consumer looks the handler up to run it.

Users add their own types without touching this project, in either of two ways:

* a module named in ``TASK_HANDLER_MODULES`` that calls :func:`task_type` when
  imported, or
* an entry point in the ``outbox_tasks.handlers`` group pointing at such a
  module, or at a function that takes the registry and registers into it.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import structlog

from outbox_relay.errors import SettingsError
from service.errors import UnknownTaskTypeError

if TYPE_CHECKING:
    import asyncio
    import uuid

    from sqlalchemy.ext.asyncio import AsyncConnection

ENTRY_POINT_GROUP = "outbox_tasks.handlers"

PayloadT = TypeVar("PayloadT")

logger = structlog.get_logger(__name__)


class NonRetryableTaskError(Exception):
    """Raised by a handler when another attempt cannot succeed.

    The task is FAILED at once with this error's message, whatever attempts
    it has left.
    """


@dataclass(frozen=True, kw_only=True)
class TaskContext:
    """What a running handler knows about its task."""

    task_id: uuid.UUID
    task_type: str
    attempt: int
    max_attempts: int
    #: Set when the task is cancelled while running; long handlers may poll
    #: it, though the consumer also cancels the handler's coroutine.
    cancelled: asyncio.Event


Handler = Callable[[Any, TaskContext], Awaitable[Any]]
#: Runs inside the transaction that records the outcome, with its result.
Recorder = Callable[["AsyncConnection", TaskContext, Any], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class TaskType(Generic[PayloadT]):
    name: str
    payload_type: type[PayloadT]
    handler: Handler
    description: str = ""
    #: Seconds one attempt may run before it counts as failed; None: no limit.
    timeout: float | None = None
    #: Optional writes that must commit together with the result, exactly once.
    recorder: Recorder | None = None

    def decode(self, payload: Any) -> PayloadT:
        """Convert a JSON object into the payload type, or raise ValidationError."""
        return msgspec.convert(payload, self.payload_type)

    def json_schema(self) -> dict[str, Any]:
        return msgspec.json.schema(self.payload_type)


@dataclass
class HandlerRegistry:
    _types: dict[str, TaskType[Any]] = field(default_factory=dict)

    def register(self, task_type: TaskType[Any]) -> None:
        if task_type.name in self._types:
            raise ValueError(f"task type {task_type.name!r} is already registered")
        self._types[task_type.name] = task_type

    def get(self, name: str) -> TaskType[Any]:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownTaskTypeError(name) from None

    def names(self) -> list[str]:
        """The registered type names, sorted."""
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[TaskType[Any]]:
        return iter(sorted(self._types.values(), key=lambda t: t.name))


#: The registry modules register into when they are imported.
default_registry = HandlerRegistry()


def task_type(
    name: str,
    payload_type: type[PayloadT],
    *,
    description: str = "",
    timeout: float | None = None,
    recorder: Recorder | None = None,
    registry: HandlerRegistry | None = None,
) -> Callable[[Handler], Handler]:
    """Decorator that registers an async handler under ``name``."""

    def register(handler: Handler) -> Handler:
        (registry or default_registry).register(
            TaskType(
                name=name,
                payload_type=payload_type,
                handler=handler,
                description=description or (handler.__doc__ or "").strip(),
                timeout=timeout,
                recorder=recorder,
            )
        )
        return handler

    return register


def load_registry(extra_modules: str = "") -> HandlerRegistry:
    """Import the built-in handlers, entry points and ``extra_modules``.

    ``extra_modules`` is a comma-separated list of importable module names.
    Importing twice is harmless: Python caches modules, so nothing registers
    twice.
    """
    importlib.import_module("service.handlers")

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if callable(loaded):
            loaded(default_registry)
        logger.debug("handlers_loaded", entry_point=entry_point.name)

    for module in filter(None, (m.strip() for m in extra_modules.split(","))):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # A misspelt name is a setting's fault; an import failing inside
            # the module is the module's, and keeps its traceback.
            if exc.name != module and not module.startswith(f"{exc.name}."):
                raise
            raise SettingsError(
                f"TASK_HANDLER_MODULES names {module!r}, which cannot be"
                f" imported: {exc}"
            ) from exc
        logger.debug("handlers_loaded", module=module)

    return default_registry
