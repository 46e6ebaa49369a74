"""EleutherAI's lm-evaluation-harness on a checkpoint: the checkpoint is exported with the GPT-2
tokenizer (pipeline.interop.hf_export.export_cached, reused while it is the same checkpoint),
`lm_eval.simple_evaluate` runs lm-eval's `hf` model on that folder, and the metrics are written
beside the checkpoint's evaluation results (pipeline.evaluation.reports:
`<run>/eval/<checkpoint>.lm_eval.json` and the run's summary.md).

lm-eval is an optional dependency (the `eval` extra), imported here only, when called. Its
Python API serves rather than its command line: one call returns the results as a dict, and the
tasks are resolved (unknown ones refused) and their data loaded before anything is exported.

Command line (pipeline/lm_eval.py):
  python -m pipeline.lm_eval runs/NAME[/checkpoints/step_NNNNNNN] [--tasks a,b,task.yaml,DIR]
      [--include DIR] [--limit N] [--num-fewshot K] [--batch-size B|auto] [--device D]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pipeline.errors import LMEvalError
from pipeline.evaluation.reports import write_lm_eval_report
from pipeline.interop.hf_export import export_cached
from pipeline.training.checkpoint.folder import read_state, resolve_checkpoint, weights_sha256

DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai")
"""Zero-shot benchmarks that small GPT-2s score above chance on (lm-eval's task names)."""
INSTALL = "pip install -e '.[eval]'"
YAML = (".yaml", ".yml")


def require_lm_eval() -> ModuleType:
    """The lm_eval package (with transformers, which its `hf` model needs). Raises LMEvalError
    saying how to install it."""
    try:
        import lm_eval
        import transformers  # noqa: F401
    except ImportError as e:
        raise LMEvalError(
            f"lm-evaluation-harness is not installed ({e}); install it with {INSTALL}"
        ) from None
    return lm_eval


def _specs(manager: Any, spec: str) -> list[str]:
    """What lm-eval is given for one entry of resolve_tasks' `tasks`; [] for none."""
    from lm_eval.tasks import TaskManager

    path = Path(spec)
    if names := manager.match_tasks([spec]):  # a name wins over a folder of that name
        return names
    if path.is_dir():  # its tasks (not its groups, which would list them twice)
        return TaskManager(include_path=str(path), include_defaults=False).all_subtasks
    if path.suffix in YAML and path.is_file():
        return [str(path.resolve())]
    return []


def resolve_tasks(tasks: Sequence[str], include: Sequence[str | os.PathLike] = ()) -> tuple:
    """(lm-eval TaskManager, task specs) for `tasks`, each one of: a name of lm-eval's tasks,
    groups or tags, or of a task in an `include` folder (glob patterns such as `arc_*` too); a
    task YAML file; a folder of task YAML files (every task defined there). Folders given either
    way are lm-eval's include_path. Raises LMEvalError naming every task that is none of these."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise LMEvalError("no lm-eval task given: name at least one (--tasks hellaswag,...)")
    if missing := [str(d) for d in include if not Path(d).is_dir()]:
        raise LMEvalError(f"--include {', '.join(missing)}: no such folder of task YAML files")
    folders = [str(f) for f in (*include, *(t for t in tasks if Path(t).is_dir()))]
    manager = TaskManager(include_path=folders or None)
    chosen: list[str] = []
    unknown = []
    for spec in tasks:
        found = _specs(manager, spec)
        if not found:
            unknown.append(spec)
        chosen += [f for f in found if f not in chosen]
    if unknown:
        raise LMEvalError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}: not a task, group or tag of "
            f"lm-eval {metadata.version('lm_eval')} nor a task YAML file or folder (`lm-eval ls "
            "tasks` lists them; --include DIR adds the tasks of a folder of YAML files)"
        )
    return manager, chosen


def load_tasks(manager: Any, chosen: list[str]) -> None:
    """Build the tasks and load their data once, before anything is exported (lm-eval loads
    them again from the datasets cache). Raises LMEvalError for a task YAML lm-eval cannot
    read or data it cannot load (a missing file, the hub unreachable or offline)."""
    import yaml

    try:
        manager.load(chosen)
    except (KeyError, ValueError, TypeError, OSError, yaml.YAMLError) as e:  # task configs
        detail = e.args[0] if isinstance(e, KeyError) and e.args else f"{type(e).__name__}: {e}"
        hint = "; check the task's YAML (lm-eval's docs/task_guide.md)"
        if isinstance(e, ConnectionError):
            hint = (
                "; lm-eval's own tasks download their data from the Hugging Face hub: check the "
                "network and unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, or give a local task "
                "YAML"
            )
        raise LMEvalError(f"lm-eval cannot load {', '.join(chosen)}: {detail}{hint}") from e


def _number(value: Any) -> float | None:
    """A finite metric value as float; None for lm-eval's "N/A" and the like."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def task_metrics(entry: dict) -> dict[str, dict]:
    """{metric: {"value", "stderr"}} of one task's lm-eval results (keys `metric,filter` and
    `metric_stderr,filter`; the filter is named when it is not `none`)."""
    out = {}
    for key, value in entry.items():
        metric, comma, filt = key.partition(",")
        if not comma or metric.endswith("_stderr") or _number(value) is None:
            continue
        name = metric if filt == "none" else f"{metric} ({filt})"
        out[name] = {
            "value": _number(value),
            "stderr": _number(entry.get(f"{metric}_stderr,{filt}")),
        }
    return out


def lm_eval_record(results: dict, checkpoint: Path, state: dict, export: Path) -> dict:
    """Our record of what `lm_eval.simple_evaluate` returned for a checkpoint: the checkpoint
    (folder, step, tokens seen, the fingerprint of its tensors: weights_sha256), the export
    evaluated, and per task its metrics with stderr, samples scored (`samples` of `of`),
    n-shot, task version and the settings."""
    config = results.get("config", {})
    date = datetime.fromtimestamp(results.get("date", 0), timezone.utc).isoformat(
        timespec="seconds"
    )
    tasks = {}
    for task, entry in results["results"].items():
        counts = results.get("n-samples", {}).get(task, {})
        tasks[task] = {
            "metrics": task_metrics(entry),
            "samples": counts.get("effective"),
            "of": counts.get("original"),
            "num_fewshot": results.get("n-shot", {}).get(task),
            "version": results.get("versions", {}).get(task),
            "limit": config.get("limit"),
            "batch_size": config.get("batch_size"),
            "device": config.get("device"),
            "lm_eval_version": metadata.version("lm_eval"),
            "date": date,
        }
    return {
        "checkpoint": str(checkpoint),
        "step": state.get("step"),
        "tokens_seen": state.get("tokens_seen"),
        "model_sha256": weights_sha256(state),
        "export": str(export),
        "tasks": tasks,
    }


def run_lm_eval(
    checkpoint: str | os.PathLike,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    include: Sequence[str | os.PathLike] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
) -> tuple[dict, Path]:
    """Evaluate a checkpoint (or a run folder's newest) with lm-evaluation-harness.

    Resolves and loads the tasks (resolve_tasks, load_tasks), exports the checkpoint with its
    tokenizer to `<run>/hf_export/` unless that already holds it (export_cached), runs
    `lm_eval.simple_evaluate(model="hf", ...)` on it, and writes the record (lm_eval_record)
    as `<run>/eval/<checkpoint>.lm_eval.json`, keeping the other tasks of an earlier record of
    the same checkpoint, and the run's summary.md. limit: at most this many examples per task
    (a quick check, not a benchmark figure); device: cpu, cuda, cuda:1, ... (default: cuda when
    available, else cpu).
    Returns (the record of this run's tasks, the JSON's path). Raises LMEvalError,
    CheckpointError, HFError, DataError or OutputError."""
    lm_eval = require_lm_eval()
    read_state(resolve_checkpoint(checkpoint))  # a wrong path fails before lm-eval's work
    manager, chosen = resolve_tasks(tasks, include)
    load_tasks(manager, chosen)
    export, ckpt, state = export_cached(checkpoint)
    # lm-eval's `hf` model takes "cuda" when given no device, also where there is none
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(export)},
        tasks=chosen,
        task_manager=manager,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,
    )
    record = lm_eval_record(results, ckpt, state, export)
    path = write_lm_eval_report(record, ckpt.parent.parent / "eval", ckpt.name)
    return record, path
