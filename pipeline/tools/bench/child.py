"""Benchmark tasks in fresh python processes: memory peaks and compile caches of their own.

The parent runs `python -c CHILD_CODE TASK PARAMS_JSON` from the repository; the child runs the
task and prints its result as one line `bench-result: <JSON>` on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from pipeline.tools.bench.host import REPO

CHILD_CODE = (
    "import sys; from pipeline.tools.bench.child import child_main; child_main(*sys.argv[1:])"
)
RESULT_MARK = "bench-result: "


def run_child(task: str, params: dict[str, Any], env: dict[str, str] | None = None) -> dict:
    """Run child_main(task, params) in a fresh python process (cwd: the repository) and return
    the dict it reports. Raises RuntimeError with the end of its output when it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CODE, task, json.dumps(params)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"benchmark child '{task}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def child_main(task: str, params_json: str) -> None:
    """Entry point of a child process: run one task (prepare, train or compile) and print its
    result as one JSON line."""
    # Imported here: the task modules import run_child from this one.
    from pipeline.tools.bench import compiling, prepare, train

    tasks = {"prepare": prepare.prepare_child, "train": train.train_child,
             "compile": compiling.compile_child}  # fmt: skip
    result = tasks[task](json.loads(params_json))
    print(RESULT_MARK + json.dumps(result), flush=True)
