from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL
from tests.support.processes import ProcessGroup, base_env
from tests.support.proxy import free_port


@pytest.fixture
def processes(
    database_url: str, amqp_prefix: str, tmp_path: Path
) -> Iterator[ProcessGroup]:
    """Real processes for one test; every one must exit 0 on SIGTERM at the end."""
    group = ProcessGroup(
        env=base_env(database_url, AMQP_URL, amqp_prefix, free_port()),
        log_dir=tmp_path,
        api_port=0,
    )
    group.api_port = int(group.env["API_PORT"])
    yield group

    codes = group.stop_all()
    assert all(code == 0 for code in codes.values()), (codes, group.log_text())
