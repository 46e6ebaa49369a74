"""Benchmark tasks in fresh python processes: memory peaks and compile caches of their own.

The parent runs `python -c CHILD_CODE TASK PARAMS_JSON` from the repository, TASK naming a task
function (`module:function`, taking the params dict and returning a JSON-able dict); the child
runs it and prints its result as one line `bench-result: <JSON>` on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.tools.host import REPO
from pipeline.tools.process import run_timed

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
    command = [sys.executable, "-c", CHILD_CODE, task_name(task), json.dumps(params)]
    done = run_timed(command, env=env).check(f"benchmark child '{task_name(task)}'")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if not lines:
        raise RuntimeError(f"benchmark child '{task_name(task)}' printed no result:\n{done.tail()}")
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
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*torchrun, f"--nproc_per_node={processes}", "--tee=1", str(script)]
        done = run_timed(
            [*command, task_name(task), json.dumps(params)],
            env={"PYTHONPATH": str(REPO), **(env or {})},
        ).check(f"benchmark ranks '{task_name(task)}'")
    found = {}
    for line in done.stdout.splitlines():  # "[default<rank>]:bench-result: {...}" with --tee
        head, mark, body = line.partition(RESULT_MARK)
        if mark:
            found[int("".join(c for c in head if c.isdigit()) or 0)] = json.loads(body)
    if len(found) != processes:
        name = task_name(task)
        raise RuntimeError(
            f"benchmark ranks '{name}': {len(found)} of {processes} reported:\n{done.tail()}"
        )
    return [found[r] for r in sorted(found)]


def child_main(task: str, params_json: str) -> None:
    """Entry point of a child process: import the task function `task` (`module:function`),
    run it on the params and print its result as one JSON line."""
    module, function = task.split(":")
    result = getattr(importlib.import_module(module), function)(json.loads(params_json))
    print(RESULT_MARK + json.dumps(result), flush=True)
