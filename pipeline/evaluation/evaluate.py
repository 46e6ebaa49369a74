"""Evaluation stage: `python -m pipeline.evaluate checkpoint=runs/<run_name>` (or pretrained=gpt2).

Tasks (`tasks=[val_loss,hellaswag]`, default `[val_loss]`):

- val_loss: the mean next-token cross-entropy (nats) over the fixed validation windows of
  `pipeline.data.loader.ValidationWindows` (the first eval_tokens tokens of the validation split
  in consecutive block_size + 1 windows), identical for every checkpoint; perplexity = exp(loss).
- hellaswag: completion-style HellaSwag accuracy, acc and acc_norm (see pipeline.hellaswag).

The model is a checkpoint (a run folder's newest by default) or, with `pretrained=`, OpenAI's GPT-2
weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 folder. Results go to
`<run_dir>/eval/<checkpoint name>.json` with a Markdown table beside it (`.md`) and a table of
all the run's evaluations, `<run_dir>/eval/summary.md`; OpenAI weights to `runs/openai/eval/`.
Evaluating a checkpoint again on other tasks adds them to its results (see keep_earlier_tasks).

The fields tasks, model, hellaswag_path and hellaswag_limit are read with defaults, so this
module also runs with an EvaluateConfig that does not declare them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

from pipeline.config import EvaluateConfig, as_dict
from pipeline.data.loader import ValidationWindows
from pipeline.data.shards import open_split
from pipeline.data.tokenizer import get_encoding
from pipeline.errors import (
    ConfigError,
    raise_if,
)
from pipeline.evaluation.hellaswag import evaluate_hellaswag, load_items, resolve_path
from pipeline.evaluation.scoring import estimate_loss, generate_text
from pipeline.files import write_bytes_atomic, write_json_atomic
from pipeline.interop.hf import load_hf_dir, load_openai_gpt2, openai_repo
from pipeline.model import GPT
from pipeline.training.checkpoint import load_model
from pipeline.training.runtime import (
    autocast_for,
    keep_freed_memory_on_cpu,
    resolve_device,
    resolve_precision,
)

TASKS = ("val_loss", "hellaswag")
OPENAI_EVAL_DIR = Path("runs") / "openai" / "eval"
"""Results of OpenAI's weights (relative to the working directory)."""
SUMMARY = "summary.md"


# --------------------------------------------------------------------------- the stage


@dataclass
class Loaded:
    """A model to evaluate and where it came from."""

    model: GPT
    name: str
    """Stem of the result files: the checkpoint folder's name (step_NNNNNNN) or the model's."""
    source: str
    """The checkpoint folder, the hub repo or the local Hugging Face folder."""
    eval_dir: Path
    """Folder of the results: `<run>/eval`, `runs/openai/eval` or `<hf folder>/eval`."""
    step: int | None = None
    tokens_seen: int | None = None
    train_config: dict | None = None
    """The training config recorded in the checkpoint (None for imported weights)."""


def _checkpoint(cfg: Any) -> str | None:
    value = getattr(cfg, "checkpoint", None)
    return None if value in (None, "", MISSING) else value


def _tasks(cfg: Any) -> list[str]:
    return list(getattr(cfg, "tasks", None) or ["val_loss"])


def task_problems(cfg: Any) -> list[str]:
    """Problems of the fields `tasks`, `pretrained`, `hellaswag_limit` next to `checkpoint` (read
    with defaults, so configs without these fields pass), each with the fix."""
    out, tasks = [], _tasks(cfg)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        out.append(f"tasks: unknown {unknown}; choose among {list(TASKS)}, e.g. tasks=[val_loss]")
    name = getattr(cfg, "pretrained", None)
    if (_checkpoint(cfg) is None) == (name is None):
        out.append(
            "set exactly one of checkpoint=runs/NAME (a checkpoint) and pretrained=gpt2 (OpenAI "
            "weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder)"
        )
    if name is not None and "val_loss" in tasks and (cfg.shard_dir is None or not cfg.block_size):
        out.append(
            f"pretrained={name} with the val_loss task needs shard_dir=shards/NAME and "
            "block_size=N (no checkpoint records them), or tasks=[hellaswag]"
        )
    limit = getattr(cfg, "hellaswag_limit", None)
    if limit is not None and limit < 1:
        out.append(f"hellaswag_limit={limit} must be >= 1 or null (all items)")
    return out


def load_for_eval(checkpoint: str | None = None, pretrained: str | None = None) -> Loaded:
    """The model of a checkpoint (or a run's newest), or imported GPT-2 weights: `pretrained` is an
    OpenAI name (gpt2 ... gpt2-xl, from the hub or its cache) or a local GPT2LMHeadModel folder.
    Imported weights keep the exact vocabulary (no padding rows, which would take softmax mass).
    Raises CheckpointError, HFError or HubError."""
    if checkpoint is not None:
        gpt, ckpt, state = load_model(checkpoint)
        train_cfg = state["config"]
        eval_dir = ckpt.parent.parent / "eval"
        step, tokens = state["step"], state["tokens_seen"]
        return Loaded(gpt, ckpt.name, str(ckpt), eval_dir, step, tokens, train_cfg)
    if pretrained is None:
        raise ValueError("pass a checkpoint or pretrained weights")
    folder = Path(pretrained)
    if folder.is_dir():
        gpt = load_hf_dir(folder, padded_vocab_size=None)
        return Loaded(gpt, folder.resolve().name, str(folder), folder / "eval")
    repo = openai_repo(pretrained)
    gpt = load_openai_gpt2(pretrained, padded_vocab_size=None)
    return Loaded(gpt, repo.split("/")[-1], repo, OPENAI_EVAL_DIR)


def val_loss_result(
    model: GPT, cfg: EvaluateConfig, train_cfg: dict | None, device: torch.device, autocast
) -> dict:
    """The val_loss task: val_loss (nats/token), perplexity, eval_tokens, windows, block_size,
    shard_dir. Raises ConfigError (block_size above the model's) or ShardError."""
    data = (train_cfg or {}).get("data", {})
    shard_dir = cfg.shard_dir or data.get("shard_dir")
    block_size = cfg.block_size or data.get("block_size") or model.cfg.block_size
    if block_size > model.cfg.block_size:
        raise ConfigError(
            [f"block_size={block_size} exceeds the model's block_size {model.cfg.block_size}"]
        )
    split = open_split(shard_dir, "val", model.cfg.vocab_size)
    windows = ValidationWindows(split, block_size, cfg.eval_tokens)
    loss, tokens = estimate_loss(model, windows, cfg.micro_batch_size, device, autocast=autocast)
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "eval_tokens": tokens,
        "windows": windows.num_windows,
        "block_size": block_size,
        "shard_dir": str(shard_dir),
    }


def hellaswag_result(model: GPT, cfg: EvaluateConfig, device: torch.device, autocast) -> dict:
    """The hellaswag task on `hellaswag_path` (default: downloaded, see pipeline.hellaswag),
    its first `hellaswag_limit` items, micro_batch_size items per pass: acc, acc_norm, n, path.
    Raises HellaSwagError."""
    path = resolve_path(getattr(cfg, "hellaswag_path", None))
    items = load_items(path, getattr(cfg, "hellaswag_limit", None))
    scores = evaluate_hellaswag(
        model, items, device, batch_items=cfg.micro_batch_size, autocast=autocast
    )
    return {**scores, "path": str(path)}


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate a checkpoint (or a run's newest, or GPT-2 weights with `pretrained=`) on each
    task of `cfg.tasks` (val_loss, hellaswag); write `<eval_dir>/<name>.json`, `<name>.md` and the
    folder's summary.md; return the result: checkpoint, step, tokens_seen, parameters, tasks,
    val_loss (nats/token), perplexity, eval_tokens, ... (val_loss task), hellaswag {acc,
    acc_norm, n, path} (hellaswag task), sample, path.

    Raises ConfigError, CheckpointError, ShardError, HellaSwagError, HFError or HubError with
    what to change.
    """
    raise_if(cfg.problems() + task_problems(cfg))
    tasks = _tasks(cfg)
    loaded = load_for_eval(_checkpoint(cfg), getattr(cfg, "pretrained", None))
    device = resolve_device(cfg.cpu)
    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    model = loaded.model.to(device)
    precision = resolve_precision(cfg.precision, device)
    autocast = autocast_for(precision, device)
    result = {"checkpoint": loaded.source, "step": loaded.step, "tokens_seen": loaded.tokens_seen}
    if "val_loss" in tasks:
        result |= val_loss_result(model, cfg, loaded.train_config, device, autocast)
    result |= {
        "precision": precision,
        "evaluate_config": as_dict(cfg),
        "tasks": tasks,
        "parameters": model.num_params(),
    }
    if "hellaswag" in tasks:
        result["hellaswag"] = hellaswag_result(model, cfg, device, autocast)
    if cfg.sample_tokens:
        enc = get_encoding()
        result["sample"] = generate_text(
            model, enc, cfg.prompt, cfg.sample_tokens, device=device, seed=cfg.seed
        )
    out = loaded.eval_dir / f"{loaded.name}.json"
    result = keep_earlier_tasks(result, out)
    write_reports(result, out)
    result["path"] = str(out)
    return result


TASK_FIELDS = {
    "val_loss": ("val_loss", "perplexity", "eval_tokens", "windows", "block_size", "shard_dir"),
    "hellaswag": ("hellaswag",),
}
"""The result fields each task writes."""


def keep_earlier_tasks(result: dict, out: Path) -> dict:
    """result, plus the fields of tasks that an earlier evaluation of the same checkpoint
    (the JSON at `out`) ran and this one did not: running HellaSwag alone after the
    validation loss keeps the loss. A task run again replaces its earlier figures. `tasks`
    lists both runs' tasks."""
    try:
        earlier = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return result
    key = ("checkpoint", "step")
    if not isinstance(earlier, dict) or [earlier.get(k) for k in key] != [result[k] for k in key]:
        return result
    kept = [t for t in earlier.get("tasks", []) if t in TASK_FIELDS and t not in result["tasks"]]
    merged = dict(result)
    for task in kept:
        merged |= {k: earlier[k] for k in TASK_FIELDS[task] if k in earlier}
    merged["tasks"] = [t for t in TASKS if t in result["tasks"] or t in kept]
    return merged


# --------------------------------------------------------------------------- reports


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report_rows(r: dict) -> list[tuple[str, str]]:
    """(metric, value) pairs of one result, `–` where a task was not run."""
    hs = r.get("hellaswag") or {}
    return [
        ("step", _fmt(r.get("step"), "d")),
        ("tokens trained", _fmt(r.get("tokens_seen"), ",d")),
        ("parameters", _fmt(r.get("parameters"), ",d")),
        ("validation loss (nats/token)", _fmt(r.get("val_loss"), ".4f")),
        ("perplexity", _fmt(r.get("perplexity"), ".2f")),
        ("validation tokens", _fmt(r.get("eval_tokens"), ",d")),
        ("HellaSwag acc", _fmt(hs.get("acc"), ".4f")),
        ("HellaSwag acc_norm", _fmt(hs.get("acc_norm"), ".4f")),
        ("HellaSwag items", _fmt(hs.get("n"), ",d")),
    ]


def checkpoint_markdown(name: str, r: dict) -> str:
    """A Markdown table of one evaluation result."""
    lines = [f"# {name}", "", f"`{r['checkpoint']}`", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {metric} | {value} |" for metric, value in report_rows(r)]
    return "\n".join(lines) + "\n"


def _step_order(item: tuple[str, dict]) -> tuple:
    name, r = item
    step = r.get("step")
    return (step is not None, step or 0, r.get("parameters") or 0, name)


def read_results(eval_dir: str | os.PathLike) -> dict[str, dict]:
    """Every evaluation JSON of a folder by file stem, ordered by step (imported weights, which
    have none, first, by size); files that are not evaluation results are skipped."""
    found = {}
    for path in Path(eval_dir).glob("*.json"):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and "checkpoint" in r:
            found[path.stem] = r
    return dict(sorted(found.items(), key=_step_order))


def summary_markdown(title: str, results: dict[str, dict]) -> str:
    """A Markdown table with one row per result (as read_results gives them)."""
    head = ["checkpoint"] + [metric for metric, _ in report_rows({})]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        lines.append("| " + " | ".join([name] + [v for _, v in report_rows(r)]) + " |")
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out: Path) -> None:
    """Write result as JSON at `out`, its Markdown table beside it (`.md`), and the folder's
    summary.md over all its results; each file atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    write_bytes_atomic(out.with_suffix(".md"), checkpoint_markdown(out.stem, result).encode())
    title = f"Evaluations of {out.parent.parent.name}"
    summary = summary_markdown(title, read_results(out.parent))
    write_bytes_atomic(out.parent / SUMMARY, summary.encode())


# --------------------------------------------------------------------------- command line


def describe(r: dict) -> str:
    """The result in a few lines for the terminal."""
    trained = "" if r["tokens_seen"] is None else f", {r['tokens_seen']:,} tokens trained"
    step = "" if r["step"] is None else f"step {r['step']}"
    lines = [f"{r['checkpoint']} ({step or 'imported weights'}{trained})"]
    if "val_loss" in r:
        lines.append(
            f"val loss {r['val_loss']:.4f} | perplexity {r['perplexity']:.2f} | "
            f"{r['eval_tokens']:,} tokens in {r['windows']} windows of {r['block_size']}"
        )
    if "hellaswag" in r:
        hs = r["hellaswag"]
        lines.append(
            f"HellaSwag acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f} | {hs['n']:,} items"
        )
    if "sample" in r:
        lines.append(f"sample: {r['sample']}")
    return "\n".join(lines)
