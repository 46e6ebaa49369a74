"""Running a stage or tool the way a user does: `python -m pipeline.X ...` in a fresh process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from helpers.env import process_env
from helpers.paths import REPO


def command(module: str, *args: str) -> list[str]:
    """The command line of `python -m pipeline.<module> args...` with this interpreter."""
    return [sys.executable, "-m", f"pipeline.{module}", *args]


def run_module(
    module: str,
    *args: str,
    cwd: str | Path = REPO,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.<module> args...` to its end (stdout and stderr captured as
    text; `env` adds variables to process_env()). Raises subprocess.TimeoutExpired after
    timeout seconds."""
    return subprocess.run(
        command(module, *args),
        cwd=cwd,
        env=process_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sigint_as_at_a_terminal() -> None:
    """preexec_fn of a child the test sends SIGINT (Ctrl-C): SIGINT's default action, however
    the tests were started (a shell starts background jobs with SIGINT ignored, and an ignored
    signal stays ignored across exec, where python then installs no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(process: subprocess.Popen, ready: Callable[[], bool], timeout_s: float) -> None:
    """Poll ready() every 50 ms until it holds; fails if the process ends first or timeout_s
    seconds pass (a hang)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
