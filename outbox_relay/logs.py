"""Structured logging: JSON lines for machines, coloured lines for a terminal.

Only entry points call :func:`configure_logging`; modules just ask
``structlog.get_logger(__name__)``. Library loggers (uvicorn, aio-pika,
SQLAlchemy) go through the same processors and renderer, so a process prints
one format.

The project's own events do not pass through the standard library: the
consumer logs a line per task and the API one per request, and a
``LogRecord``, a handler and a formatter per line cost more than rendering
it. A call below the level is a no-op.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import msgspec
import structlog

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


class _NamedWriteLoggerFactory:
    """Makes structlog's ``WriteLogger`` for a stream, carrying the name it
    was asked for (``get_logger(__name__)``) for ``add_logger_name``."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> structlog.WriteLogger:
        logger = structlog.WriteLogger(self._file)
        logger.name = args[0] if args else "root"  # type: ignore[attr-defined]
        return logger


def _json_line(event: dict[str, Any], default: Callable[[Any], Any]) -> str:
    """One event as a JSON object, by msgspec: several times cheaper than the
    standard library's encoder, for a line per request or task. ``default``
    is structlog's fallback (``repr`` for what JSON has no form for)."""
    return msgspec.json.encode(event, enc_hook=default).decode()


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    """Print structlog's events and library records through one renderer.

    ``json=None`` picks JSON unless standard error is a terminal.
    """
    if json is None:
        json = not sys.stderr.isatty()

    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if json
        else structlog.dev.ConsoleRenderer(
            colors=True, exception_formatter=structlog.dev.plain_traceback
        )
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

    # These libraries narrate every frame at INFO; their warnings still show.
    for noisy in ("aio_pika", "aiormq", "uvicorn.access", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=_NamedWriteLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        cache_logger_on_first_use=True,
    )
