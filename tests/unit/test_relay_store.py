"""Which asyncpg errors the relay waits out, and which stop it."""

from __future__ import annotations

import asyncpg
import pytest

from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.store import database_errors, is_transient


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("refused"),
        TimeoutError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-query"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("starting up"),
        asyncpg.exceptions.TooManyConnectionsError("too many"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock"),
        asyncpg.InterfaceError("connection is closed"),
    ],
)
def test_losing_the_server_is_waited_out(error: Exception) -> None:
    assert is_transient(error)
    with pytest.raises(DatabaseUnavailableError), database_errors():
        raise error


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UndefinedTableError("no outbox table"),
        asyncpg.exceptions.InvalidPasswordError("bad password"),
        asyncpg.exceptions.InvalidCatalogNameError("no such database"),
        asyncpg.exceptions.ClientConfigurationError("bad dsn"),
        ValueError("a bug"),
    ],
)
def test_faults_propagate_unchanged(error: Exception) -> None:
    assert not is_transient(error)
    with pytest.raises(type(error)), database_errors():
        raise error
