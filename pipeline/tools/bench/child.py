"""Benchmark tasks in fresh python processes: memory peaks and compile caches of their own.

The parent runs `python -c CHILD_CODE TASK PARAMS_JSON` from the repository, TASK naming a task
function (`module:function`, taking the params dict and returning a JSON-able dict); the child
runs it and prints its result as one line `bench-result: <JSON>` on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.tools.bench.host import REPO

CHILD_CODE = (
    "import sys; from pipeline.tools.bench.child import child_main; child_main(*sys.argv[1:])"
)
RESULT_MARK = "bench-result: "


Task = Callable[[dict[str, Any]], dict[str, Any]]
"""A benchmark task run in a child: a module-level function of params (JSON-able) to a result."""


def task_name(task: Task) -> str:
    """`module:function`, the name child_main imports a task by."""
    return f"{task.__module__}:{task.__qualname__}"


def run_child(task: Task, params: dict[str, Any], env: dict[str, str] | None = None) -> dict:
    """Run task(params) in a fresh python process (cwd: the repository) and return the dict it
    reports. Raises RuntimeError with the end of its output when it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CODE, task_name(task), json.dumps(params)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        name = task_name(task)
        raise RuntimeError(f"benchmark child '{name}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def run_ranks(
    task: Task, params: dict[str, Any], processes: int, env: dict[str, str] | None = None
) -> list[dict]:
    """task(params) in `processes` fresh processes started by torch.distributed.run
    (standalone: RANK, WORLD_SIZE and the rendezvous set for each); returns each rank's dict,
    in rank order. Raises RuntimeError with the end of their output when they fail."""
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD_CODE + "\n")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={processes}", "--tee=1", str(script), task_name(task),
             json.dumps(params)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            capture_output=True, text=True,
        )  # fmt: skip
    found = {}
    for line in proc.stdout.splitlines():  # "[default<rank>]:bench-result: {...}" with --tee
        head, mark, body = line.partition(RESULT_MARK)
        if mark:
            found[int("".join(c for c in head if c.isdigit()) or 0)] = json.loads(body)
    if proc.returncode or len(found) != processes:
        tail = (proc.stdout + proc.stderr)[-4000:]
        name = task_name(task)
        raise RuntimeError(f"benchmark ranks '{name}' failed (exit {proc.returncode}):\n{tail}")
    return [found[r] for r in sorted(found)]


def child_main(task: str, params_json: str) -> None:
    """Entry point of a child process: import the task function `task` (`module:function`),
    run it on the params and print its result as one JSON line."""
    module, function = task.split(":")
    result = getattr(importlib.import_module(module), function)(json.loads(params_json))
    print(RESULT_MARK + json.dumps(result), flush=True)
