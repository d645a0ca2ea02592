"""Exceptions of the consumer package; every one derives from ``ConsumerError``.

Driver errors (asyncpg through SQLAlchemy, sockets) are classified here once,
by :func:`is_transient_database_error`, and nowhere else.
"""

from __future__ import annotations

import sqlalchemy.exc

#: SQLSTATE classes that say "try again later", not "this statement is wrong":
#: connection exceptions, transaction rollbacks (serialisation failures,
#: deadlocks), insufficient resources and operator intervention (shutdown).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})
#: Individual SQLSTATEs of the same kind: lock not available.
_TRANSIENT_SQLSTATES = frozenset({"55P03"})


class ConsumerError(Exception):
    """Root of the consumer's exceptions."""


class UnprocessableMessageError(ConsumerError):
    """No delivery of this message can ever succeed; it is dead-lettered.

    ``reason`` is a short, stable phrase for logs; it never contains the body.
    ``kind`` names the reason in one word from a fixed set (``not_json``,
    ``invalid_body``, ``no_message_id``, ``unknown_type``,
    ``task_not_found``), fit for a metric label.
    """

    def __init__(self, reason: str, *, kind: str = "unprocessable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class DatabaseUnavailableError(ConsumerError):
    """PostgreSQL could not be reached or asked us to retry; the message is
    requeued and nothing it would have changed is committed."""


class HandlerTimeoutError(ConsumerError):
    """An attempt ran longer than its task type's ``timeout``."""


class RecorderFailedError(ConsumerError):
    """A task type's recorder raised; the cause is the recorder's exception."""


def is_transient_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable or busy, not that
    the statement was wrong."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | sqlalchemy.exc.TimeoutError
        | sqlalchemy.exc.DisconnectionError,
    ):
        # Refused or dropped connections, and a pool with no free connection.
        return True

    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, sqlalchemy.exc.OperationalError):
            return True
        exc = exc.orig if exc.orig is not None else exc

    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    return sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] in (
        _TRANSIENT_SQLSTATE_CLASSES
    )
