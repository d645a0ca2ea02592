from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from consumer.settings import ConsumerSettings
from outbox_relay.config import (
    asyncpg_dsn,
    load_settings,
    mask_url,
    sqlalchemy_url,
)
from outbox_relay.errors import SettingsError
from outbox_relay.settings import RelaySettings
from service.app import create_app
from service.registry import load_registry
from service.settings import ServiceSettings


class Example(msgspec.Struct, kw_only=True):
    database_url: str = "postgresql://localhost/db"
    port: int = 1
    verbose: bool | None = None


def test_values_come_from_upper_case_variables_and_are_converted() -> None:
    settings = load_settings(
        Example, {"DATABASE_URL": "postgresql://h/x", "PORT": "8080", "VERBOSE": "true"}
    )

    assert settings == Example(database_url="postgresql://h/x", port=8080, verbose=True)


def test_defaults_apply_to_unset_variables() -> None:
    assert load_settings(Example, {}) == Example()


def test_a_secret_can_be_read_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("postgresql://u:pw@h/x\n")

    settings = load_settings(Example, {"DATABASE_URL_FILE": str(secret)})

    assert settings.database_url == "postgresql://u:pw@h/x"


def test_both_a_value_and_a_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="either"):
        load_settings(Example, {"PORT": "1", "PORT_FILE": str(tmp_path)})


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="PORT_FILE"):
        load_settings(Example, {"PORT_FILE": str(tmp_path / "missing")})


def test_invalid_values_are_reported_at_start_up() -> None:
    with pytest.raises(SettingsError, match="port"):
        load_settings(Example, {"PORT": "eighty"})


@pytest.mark.parametrize(
    ("settings_type", "variable", "value"),
    [
        (ServiceSettings, "LOG_LEVEL", "LOUD"),
        (ServiceSettings, "API_PORT", "70000"),
        (RelaySettings, "LOG_LEVEL", "verbose"),
        (RelaySettings, "RELAY_HEALTH_PORT", "-1"),
        (ConsumerSettings, "LOG_LEVEL", "TRACE"),
        (ConsumerSettings, "CONSUMER_HEALTH_PORT", "65536"),
    ],
)
def test_log_levels_and_ports_are_checked_at_start_up(
    settings_type: type[msgspec.Struct], variable: str, value: str
) -> None:
    with pytest.raises(SettingsError, match=variable.lower()):
        load_settings(settings_type, {variable: value})


@pytest.mark.parametrize(
    ("variable", "value", "match"),
    [
        ("DB_POOL_SIZE", "0", "db_pool_size"),
        ("DEFAULT_MAX_ATTEMPTS", "0", "default_max_attempts"),
        ("DEFAULT_MAX_ATTEMPTS", "101", "default_max_attempts"),
        ("RATE_LIMIT_STORAGE_URL", "http://cache:6379", "redis://"),
    ],
)
def test_the_apis_pool_defaults_and_redis_are_checked_at_start_up(
    variable: str, value: str, match: str
) -> None:
    with pytest.raises(SettingsError, match=match):
        load_settings(ServiceSettings, {variable: value})


def test_a_default_task_type_without_a_handler_stops_the_api_at_start_up() -> None:
    settings = ServiceSettings(default_task_type="nope")

    with pytest.raises(SettingsError, match=r"DEFAULT_TASK_TYPE 'nope'.*checksum"):
        create_app(settings, load_registry())


@pytest.mark.parametrize(
    "settings_type", [ServiceSettings, RelaySettings, ConsumerSettings]
)
def test_a_database_url_of_another_kind_is_refused_at_start_up(
    settings_type: type[msgspec.Struct],
) -> None:
    with pytest.raises(SettingsError, match="postgresql://"):
        load_settings(settings_type, {"DATABASE_URL": "http://db:5432/tasks"})


def test_a_misspelt_handler_module_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"'no\.such\.handlers'"):
        load_registry("no.such.handlers")


def test_a_handler_module_that_fails_to_import_keeps_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_handlers.py").write_text(
        "import a_dependency_never_installed\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ModuleNotFoundError, match="a_dependency_never_installed"):
        load_registry("broken_handlers")


def test_log_levels_are_accepted_in_any_case() -> None:
    assert load_settings(ServiceSettings, {"LOG_LEVEL": "debug"}).log_level == "debug"


def test_passwords_never_appear_in_repr() -> None:
    settings = ServiceSettings(database_url="postgresql://app:hunter2@db:5432/tasks")

    assert "hunter2" not in repr(settings)
    assert mask_url("amqp://guest:s3cret@mq:5672/") == "amqp://guest:***@mq:5672/"
    assert mask_url("postgresql://app@db/tasks") == "postgresql://app@db/tasks"


def test_database_urls_are_translated_for_each_driver() -> None:
    plain = "postgresql://app@db:5432/tasks"

    assert sqlalchemy_url(plain) == "postgresql+asyncpg://app@db:5432/tasks"
    assert asyncpg_dsn(plain) == plain
    with pytest.raises(SettingsError):
        sqlalchemy_url("mysql://app@db/tasks")
