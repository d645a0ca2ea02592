"""What ``python -m outbox_relay status`` says when the database cannot answer."""

from __future__ import annotations

import asyncpg
import pytest
from click.testing import CliRunner

import outbox_relay.__main__ as relay_cli


async def _unmigrated(database_url: str) -> None:
    raise asyncpg.UndefinedTableError('relation "outbox_lag" does not exist')


async def _missing(database_url: str) -> None:
    raise asyncpg.InvalidCatalogNameError('database "nowhere" does not exist')


def test_an_unmigrated_database_gets_one_line_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_cli, "read_lag", _unmigrated)

    result = CliRunner().invoke(relay_cli.main, ["status"])

    assert result.exit_code == 1
    assert result.output == (
        'Error: cannot read the outbox: relation "outbox_lag" does not exist'
        " (is the database migrated? run `python -m service migrate`)\n"
    )


def test_a_missing_database_gets_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_cli, "read_lag", _missing)

    result = CliRunner().invoke(relay_cli.main, ["status"])

    assert result.exit_code == 1
    assert result.output == (
        'Error: cannot read the outbox: database "nowhere" does not exist\n'
    )
