"""Benchmark tasks in fresh python processes: memory peaks and compile caches of their own.

The parent runs `python -c CHILD_CODE TASK PARAMS_JSON` from the repository; the child runs the
task and prints its result as one line `bench-result: <JSON>` on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
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


def run_ranks(
    task: str, params: dict[str, Any], processes: int, env: dict[str, str] | None = None
) -> list[dict]:
    """child_main(task, params) in `processes` fresh processes started by torch.distributed.run
    (standalone: RANK, WORLD_SIZE and the rendezvous set for each); returns each rank's dict,
    in rank order. Raises RuntimeError with the end of their output when they fail."""
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD_CODE + "\n")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={processes}", "--tee=1", str(script), task, json.dumps(params)],
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
        raise RuntimeError(f"benchmark ranks '{task}' failed (exit {proc.returncode}):\n{tail}")
    return [found[r] for r in sorted(found)]


def child_main(task: str, params_json: str) -> None:
    """Entry point of a child process: run one task (prepare, train, compile, muon) and print its
    result as one JSON line."""
    # Imported here: the task modules import run_child from this one.
    from pipeline.tools.bench import (
        checkpoint,
        compiling,
        fsdp_memory,
        mirror,
        muon,
        prepare,
        train,
    )

    tasks = {"prepare": prepare.prepare_child, "train": train.train_child,
             "compile": compiling.compile_child, "muon": muon.muon_child,
             "fsdp_memory": fsdp_memory.fsdp_memory_child,
             "checkpoint_save": checkpoint.checkpoint_save_child,
             "checkpoint_resume": checkpoint.checkpoint_resume_child,
             "mirror": mirror.mirror_child}  # fmt: skip
    result = tasks[task](json.loads(params_json))
    print(RESULT_MARK + json.dumps(result), flush=True)
