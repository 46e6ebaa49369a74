"""One error model for every stage and tool.

Every problem a user can fix (a config, the data, a checkpoint, the hub, an evaluation input)
is a `PipelineError` subclass carrying its exit code; `guard` wraps every entry point, prints
such an error as one line `error: <what is wrong and what to do>` and exits with its code.
Anything else is a bug: a traceback and exit code 1.

Exit codes (`launch/auto_resume.sh` restarts on 75 and on crashes, stops on 0, 2 and 3):

    0    done
    1    a bug (traceback)
    2    a problem the user must fix: restarting will not help      (USER_ERROR)
    3    training diverged: restarting will not help                 (DIVERGED)
    75   preempted after a checkpoint: restart to continue (EX_TEMPFAIL of sysexits.h)
    130  interrupted (Ctrl-C, 128 + SIGINT)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

USER_ERROR = 2
DIVERGED = 3
PREEMPTED = 75
INTERRUPTED = 130

INTERRUPTED_MESSAGE = "interrupted: run the same command to continue"

T = TypeVar("T")


class PipelineError(Exception):
    """A problem the user must fix; the message says what is wrong and what to do."""

    exit_code = USER_ERROR


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot run: each problem and what to change."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class DataError(PipelineError, RuntimeError):
    """Input data that cannot be used (a source, a shard folder, a benchmark file)."""


class ShardError(DataError):
    """A shard folder that cannot be used: the message names the file and what to do."""


class PrepareError(DataError):
    """The prepare stage cannot go on; the message names the thing and what to do."""


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or cannot continue this run."""


class UnsafeFileError(CheckpointError):
    """A file whose loading could run code (a pickle that names functions or classes beyond
    tensors and numbers): refused, never loaded."""


class HubError(PipelineError, RuntimeError):
    """A hub transfer that cannot go ahead or did not complete; the message says what to do."""


class HFError(PipelineError, RuntimeError):
    """Hugging Face GPT-2 weights or files that cannot be read, converted or written."""


class HellaSwagError(DataError, ValueError):
    """A HellaSwag file that cannot be found, downloaded or parsed."""


class LMEvalError(PipelineError, RuntimeError):
    """lm-evaluation-harness missing, a task it does not know, or task data it cannot load."""


class OutputError(PipelineError, OSError):
    """An output that cannot be written: a file where a folder must be, a full disk, a failed
    write. The message names it, says what is intact and what to do."""


class FolderLockedError(OutputError):
    """A run folder or prepare output held by another live process (pipeline.files.folder_lock)."""


class NumericsError(PipelineError, RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm."""

    exit_code = DIVERGED


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tools' command lines, in this error model: a mistake (a missing or
    unknown argument, a bad value) is one line `error: <prog>: <what> (--help shows the
    usage)` and exit code 2, not argparse's usage block; subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (--help shows the usage)", file=sys.stderr)
        sys.exit(USER_ERROR)


def raise_if(problems: list[str]) -> None:
    """Raise one ConfigError naming every problem, or return when there is none."""
    if problems:
        raise ConfigError(problems)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a ConfigError's problems joined by '; ')."""
    if isinstance(error, ConfigError):
        text = "invalid configuration: " + "; ".join(error.problems)
    else:
        text = str(error)
    return " ".join(text.split())


def fail(error: PipelineError) -> None:
    """Print `error: <message>` on one line to stderr and exit with the error's code."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(error.exit_code)


def guard(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: a PipelineError becomes `error: ...` and its exit code, Ctrl-C
    one line and exit code 130, anything else propagates (a bug: traceback, exit code 1)."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except PipelineError as e:
            fail(e)
        except KeyboardInterrupt:
            print(INTERRUPTED_MESSAGE, file=sys.stderr)
            sys.exit(INTERRUPTED)

    return guarded


@contextlib.contextmanager
def recorded_exit() -> Iterator[None]:
    """Record how this process exits in $PIPELINE_EXIT_DIR/rank-$RANK (when the variable is
    set, as launch/workers.sh sets it): the code of sys.exit, 130 for Ctrl-C, 1 for anything
    else. torchrun reports every failed worker as exit code 1; the launch scripts read these
    files to exit with the code that says what to do (2, 3, 75)."""
    code = 0
    try:
        yield
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    except KeyboardInterrupt:
        code = INTERRUPTED
        raise
    except BaseException:
        code = 1
        raise
    finally:
        folder = os.environ.get("PIPELINE_EXIT_DIR")
        if folder and os.path.isdir(folder):
            with contextlib.suppress(OSError):
                with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}"), "w") as f:
                    f.write(f"{code}\n")
