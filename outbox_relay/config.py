"""Typed settings from environment variables, shared by the three processes.

Each process describes its settings as a msgspec struct whose field names are
the lower-case environment variable names. A secret can be given indirectly:
``AMQP_URL_FILE=/run/secrets/amqp_url`` reads the value from that file, which
is how Docker and Kubernetes hand secrets to a container.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
from dotenv import load_dotenv

from outbox_relay.errors import SettingsError

#: A logging level by name, in any case; checked at start-up like every
#: other setting instead of failing inside the logging setup.
LogLevel = Annotated[
    str, msgspec.Meta(pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
]
#: A TCP port; 0 where a setting documents it as "off" or "any".
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

SettingsT = TypeVar("SettingsT", bound=msgspec.Struct)


def load_settings(
    settings_type: type[SettingsT], environ: Mapping[str, str] | None = None
) -> SettingsT:
    """Build ``settings_type`` from the environment, validating every field.

    A variable set both directly and as ``*_FILE`` is an error rather than a
    silent choice, so a stale secret file never wins unnoticed.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}

    for field in msgspec.structs.fields(settings_type):
        name = field.name.upper()
        file_name = f"{name}_FILE"

        if name in env and file_name in env:
            raise SettingsError(f"set either {name} or {file_name}, not both")

        if name in env:
            raw[field.name] = env[name]
        elif file_name in env:
            try:
                raw[field.name] = Path(env[file_name]).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"cannot read {file_name}: {exc}") from exc

    try:
        settings = msgspec.convert(raw, settings_type, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {exc}") from exc
    # Every process's settings name the database; a URL of another kind is
    # refused here, not when the first connection is made.
    database_url = getattr(settings, "database_url", None)
    if isinstance(database_url, str):
        sqlalchemy_url(database_url)
    return settings


def load_env_file() -> None:
    """Read ``.env`` from the working directory, if there is one.

    Variables already set in the environment win over the file.
    """
    load_dotenv(Path.cwd() / ".env", override=False)


def mask_url(url: str) -> str:
    """The URL with its password replaced, safe to log or show in a repr."""
    parts = urlsplit(url)
    if parts.password is None:
        return url

    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def sqlalchemy_url(database_url: str) -> str:
    """Turn the plain ``postgresql://`` URL users configure into asyncpg's."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or scheme not in {"postgres", "postgresql", "postgresql+asyncpg"}:
        raise SettingsError("DATABASE_URL must be a postgresql:// URL")
    return f"postgresql+asyncpg://{rest}"


def asyncpg_dsn(database_url: str) -> str:
    """The same URL in the form asyncpg's own ``connect`` accepts."""
    return "postgresql://" + sqlalchemy_url(database_url).partition("://")[2]
