"""Consumer settings: environment names, defaults, validation and masking."""

from __future__ import annotations

import pytest

from consumer.settings import ConsumerSettings
from outbox_relay.config import load_settings
from outbox_relay.errors import SettingsError
from service.settings import DEFAULT_DATABASE_URL


def test_defaults_point_at_local_services() -> None:
    settings = load_settings(ConsumerSettings, {})

    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.amqp_prefix == "tasks"
    assert settings.consumer_prefetch == 64
    assert settings.consumer_delivery_limit == 5
    assert settings.log_json is None


def test_fields_are_read_from_upper_case_variables() -> None:
    settings = load_settings(
        ConsumerSettings,
        {
            "AMQP_PREFIX": "staging",
            "CONSUMER_PREFETCH": "4",
            "CONSUMER_CANCEL_POLL_INTERVAL": "0.25",
            "TASK_HANDLER_MODULES": "a.b,c",
            "LOG_JSON": "false",
        },
    )

    assert settings.amqp_prefix == "staging"
    assert settings.consumer_prefetch == 4
    assert settings.consumer_cancel_poll_interval == 0.25
    assert settings.task_handler_modules == "a.b,c"
    assert settings.log_json is False


@pytest.mark.parametrize(
    "environ",
    [
        {"CONSUMER_PREFETCH": "0"},
        {"CONSUMER_PREFETCH": "many"},
        {"CONSUMER_CANCEL_POLL_INTERVAL": "0"},
        {"CONSUMER_SHUTDOWN_GRACE_SECONDS": "-1"},
        {"RETRY_BACKOFF_BASE_SECONDS": "-0.5"},
        {"TASK_TIME_LIMIT_SECONDS": "0"},
        {"TASK_TIME_LIMIT_GRACE_SECONDS": "-1"},
        {"TASK_SWEEP_INTERVAL_SECONDS": "0"},
    ],
)
def test_invalid_values_are_refused_at_start_up(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(ConsumerSettings, environ)


def test_repr_masks_passwords() -> None:
    settings = ConsumerSettings(
        database_url="postgresql://app:db-secret@db:5432/tasks",
        amqp_url="amqp://app:mq-secret@mq:5672/",
    )

    text = repr(settings)

    assert "db-secret" not in text
    assert "mq-secret" not in text
    assert "app:***@db" in text
