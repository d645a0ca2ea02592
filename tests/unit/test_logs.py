"""The log format every process prints: one JSON object per line on stderr."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from outbox_relay.logs import configure_logging


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


def lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines()]


def test_own_events_and_library_records_print_alike(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json=True)
    structlog.contextvars.bind_contextvars(request_id="req-1")
    try:
        structlog.get_logger("consumer.processing").info("task_processed", attempt=1)
        logging.getLogger("sqlalchemy.pool").warning("pool %s", "exhausted")
    finally:
        structlog.contextvars.clear_contextvars()

    own, library = lines(capsys.readouterr().err)
    assert {k: own[k] for k in ("event", "level", "logger", "attempt")} == {
        "event": "task_processed",
        "level": "info",
        "logger": "consumer.processing",
        "attempt": 1,
    }
    assert {k: library[k] for k in ("event", "level", "logger")} == {
        "event": "pool exhausted",
        "level": "warning",
        "logger": "sqlalchemy.pool",
    }
    for line in (own, library):
        assert line["request_id"] == "req-1"
        assert line["timestamp"].endswith("Z")


def test_events_below_the_level_print_nothing_and_errors_keep_the_traceback(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("WARNING", json=True)
    log = structlog.get_logger("outbox_relay.relay")
    log.info("outbox_batch_published", count=3)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("outbox_relay_failed")

    [line] = lines(capsys.readouterr().err)
    assert (line["event"], line["level"]) == ("outbox_relay_failed", "error")
    assert "ValueError: boom" in line["exception"]
