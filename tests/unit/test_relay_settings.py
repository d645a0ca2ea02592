from __future__ import annotations

import os

import pytest

from outbox_relay.config import load_settings
from outbox_relay.errors import SettingsError
from outbox_relay.settings import RelaySettings


def test_defaults_point_at_local_servers() -> None:
    settings = load_settings(RelaySettings, {})

    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/outbox_tasks"
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.amqp_prefix == "tasks"
    assert settings.relay_batch_size == 1024
    assert settings.relay_max_attempts == 25
    assert settings.relay_name.endswith(f"-{os.getpid()}")
    assert settings.log_json is None


def test_values_are_read_and_converted_from_the_environment() -> None:
    settings = load_settings(
        RelaySettings,
        {
            "RELAY_BATCH_SIZE": "10",
            "RELAY_POLL_INTERVAL": "0.5",
            "RELAY_NAME": "relay-a",
            "LOG_JSON": "false",
        },
    )

    assert settings.relay_batch_size == 10
    assert settings.relay_poll_interval == 0.5
    assert settings.relay_name == "relay-a"
    assert settings.log_json is False


def test_repr_hides_passwords() -> None:
    settings = load_settings(
        RelaySettings,
        {
            "DATABASE_URL": "postgresql://app:db-secret@db:5432/tasks",
            "AMQP_URL": "amqp://app:mq-secret@mq:5672/",
        },
    )

    text = repr(settings)
    assert "db-secret" not in text
    assert "mq-secret" not in text
    assert "***" in text


@pytest.mark.parametrize(
    "environ",
    [
        {"RELAY_BATCH_SIZE": "0"},
        {"RELAY_POLL_INTERVAL": "-1"},
        {"RELAY_MAX_ATTEMPTS": "many"},
        # A lease shorter than a batch's confirm wait allows double claims.
        {"RELAY_LEASE_SECONDS": "5", "RELAY_PUBLISH_TIMEOUT": "10"},
        {"RELAY_RETRY_BASE_SECONDS": "10", "RELAY_RETRY_MAX_SECONDS": "1"},
    ],
)
def test_invalid_values_are_refused_at_start_up(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(RelaySettings, environ)
