"""Helpers for end-to-end fault tests: supervising crashing processes, CLIs."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from tests.support.processes import MODULES, ProcessGroup


def restart_if_exited(group: ProcessGroup, name: str, **extra_env: str) -> int | None:
    """Start ``name`` again if it has exited, as a supervisor would.

    Returns the exit code of the process that had exited, or None if it is
    still running.
    """
    code = group.running[name].poll()
    if code is None:
        return None
    group.start(name, **extra_env)
    return code


#: Seconds a command started by :func:`run_module` may take.
COMMAND_TIMEOUT_SECONDS = 60.0


async def run_module(
    group: ProcessGroup, name: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``python -m <module of name> args`` with the group's environment."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", MODULES[name], *args],
        cwd=group.log_dir,
        env=group.env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
