"""The one way the tools run a child process: timed, with a time limit, and its output kept.

Every tool that starts a process (a benchmark's child or ranks, compare's training runs, a
benchmark sweep, preflight's nvidia-smi, all-reduce and recipe steps) calls `run_timed`. At the
time limit the child and every process below it go, found by their parent ids before any is
killed: torchrun starts its workers in sessions of their own, so killing a process group would
leave them running, holding the GPUs and the output pipe. Ctrl-C reaches the child from the
terminal, as it reaches the tool (training checkpoints and stops); the tool then kills the child
as subprocess.run does. A program that cannot be started is exit code 127 (126 when it is not
executable), as a shell reports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.tools.host import REPO

NOT_FOUND = 127
"""The exit code of a program that could not be found (a shell's); 126: found, not runnable."""
KILL_WAIT_S = 10.0
"""After the kill at the time limit, how long to read what the child's pipes still hold."""


@dataclass(frozen=True)
class Finished:
    """A child process that ended: exit code (None: killed at its time limit), its output
    (stdout and stderr; with a log file, the log holds both and stdout the log's new text) and
    its wall time in seconds."""

    command: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timeout_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, chars: int = 4000) -> str:
        """The last `chars` characters of stdout and stderr."""
        return (self.stdout + self.stderr)[-chars:]

    def last_line(self, chars: int = 300) -> str:
        """The last non-empty line of stderr (else stdout), at most `chars` characters."""
        lines = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return (lines[-1] if lines else "no output")[:chars]

    def why(self) -> str:
        """How it ended: `exit N` or `timed out after T s`."""
        return (
            f"timed out after {self.timeout_s:g} s" if self.timed_out else f"exit {self.returncode}"
        )

    def check(self, what: str) -> Finished:
        """Self when the child succeeded; else RuntimeError naming `what`, how it ended and the
        end of its output."""
        if not self.ok:
            raise RuntimeError(f"{what} failed ({self.why()}):\n{self.tail()}")
        return self


def run_timed(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = REPO,
    timeout_s: float | None = None,
    log: Path | None = None,
) -> Finished:
    """Run `command` (from `cwd`, with `env` added to this process's environment) until it ends
    or `timeout_s` seconds pass, then kill it and every process below it. With `log`, its stdout
    and stderr are appended there (the file a user reads afterwards) instead of kept in memory."""
    environ = {**os.environ, **(env or {})}
    start = time.perf_counter()
    before = log.stat().st_size if log is not None and log.exists() else 0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") if log is not None else contextlib.nullcontext() as sink:
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=environ,
                stdout=sink or subprocess.PIPE,
                stderr=subprocess.STDOUT if sink else subprocess.PIPE,
                text=True,
                errors="replace",
            )
        except OSError as e:
            code = 126 if isinstance(e, PermissionError) else NOT_FOUND
            return Finished(command, code, "", str(e), time.perf_counter() - start, timeout_s)
        with proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout_s)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                try:
                    stdout, stderr = proc.communicate(timeout=KILL_WAIT_S)
                except subprocess.TimeoutExpired:  # a process that left the tree holds a pipe
                    stdout, stderr = "", ""
                code = None
            except BaseException:  # Ctrl-C (the child had it too) or an error: as subprocess.run
                proc.kill()
                raise
    if log is not None:
        with open(log, "rb") as f:
            f.seek(before)
            stdout = f.read().decode(errors="replace")
    seconds = time.perf_counter() - start
    return Finished(command, code, stdout or "", stderr or "", seconds, timeout_s)


def _descendants(pid: int) -> list[int]:
    """The processes below pid, whatever their session (Linux's /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL pid and every process below it (found first: once killed, they are re-parented)."""
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
