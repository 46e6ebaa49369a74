"""Evaluation results on disk: `<eval_dir>/<name>.json` (the result), `<name>.md` (its
Markdown table), `<name>.lm_eval.json` (lm-evaluation-harness results of the same checkpoint)
and `summary.md` (one row per result of the folder, then a table of lm-eval metrics per
checkpoint), plus the few lines the evaluate and lm_eval commands print. This module writes
and reads these files; nothing else does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.files import make_folder, write_json_atomic, write_text_atomic

TASK_FIELDS = {
    "val_loss": (
        "val_loss",
        "perplexity",
        "eval_tokens",
        "windows",
        "block_size",
        "shard_dir",
        "manifest_fingerprint",
    ),
    "hellaswag": ("hellaswag",),
}
"""The result fields each task writes."""
TASKS = tuple(TASK_FIELDS)
"""The evaluation tasks, in the order results list them."""
SUMMARY = "summary.md"
LM_EVAL = ".lm_eval.json"
"""Suffix of the lm-evaluation-harness results of a checkpoint (`<name>.lm_eval.json`)."""


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


# --------------------------------------------------------------------------- Markdown


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


def _read_json_files(eval_dir: str | os.PathLike, lm_eval: bool) -> dict[str, dict]:
    """The evaluation results (lm_eval: the lm-eval results) of a folder by checkpoint name,
    ordered by step; files that are not such results are skipped."""
    found = {}
    for path in Path(eval_dir).glob("*.json"):
        if path.name.endswith(LM_EVAL) != lm_eval:
            continue
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and "checkpoint" in r:
            found[path.name.removesuffix(LM_EVAL if lm_eval else ".json")] = r
    return dict(sorted(found.items(), key=_step_order))


def read_results(eval_dir: str | os.PathLike) -> dict[str, dict]:
    """Every evaluation JSON of a folder by file stem, ordered by step (imported weights, which
    have none, first, by size); files that are not evaluation results are skipped."""
    return _read_json_files(eval_dir, lm_eval=False)


def read_lm_eval_results(eval_dir: str | os.PathLike) -> dict[str, dict]:
    """Every `<name>.lm_eval.json` of a folder by checkpoint name, ordered by step."""
    return _read_json_files(eval_dir, lm_eval=True)


def summary_markdown(title: str, results: dict[str, dict]) -> str:
    """A Markdown table with one row per result (as read_results gives them)."""
    head = ["checkpoint"] + [metric for metric, _ in report_rows({})]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        lines.append("| " + " | ".join([name] + [v for _, v in report_rows(r)]) + " |")
    return "\n".join(lines) + "\n"


def lm_eval_rows(record: dict) -> list[tuple[str, ...]]:
    """(task, metric, value, stderr, n-shot, samples) of every metric of an lm-eval record."""
    rows = []
    for task, entry in record["tasks"].items():
        samples = _fmt(entry.get("samples"), ",d")
        if entry.get("of") not in (None, entry.get("samples")):
            samples += f" of {entry['of']:,}"
        for metric, m in entry["metrics"].items():
            rows.append(
                (
                    task,
                    metric,
                    _fmt(m["value"], ".4f"),
                    _fmt(m.get("stderr"), ".4f"),
                    _fmt(entry.get("num_fewshot"), "d"),
                    samples,
                )
            )
    return rows


def lm_eval_table(record: dict) -> str:
    """A Markdown table of one lm-eval record: task, metric, value, stderr, n-shot, samples."""
    lines = ["| task | metric | value | stderr | n-shot | samples |", "|" + " --- |" * 6]
    lines += ["| " + " | ".join(row) + " |" for row in lm_eval_rows(record)]
    return "\n".join(lines) + "\n"


def lm_eval_markdown(records: dict[str, dict]) -> str:
    """The lm-evaluation-harness section of summary.md: one table per checkpoint."""
    parts = ["## lm-evaluation-harness\n"]
    for name, r in records.items():
        version = {e.get("lm_eval_version") for e in r["tasks"].values()} - {None}
        about = f" (lm-eval {', '.join(sorted(version))})" if version else ""
        parts += [f"### {name}{about}\n", lm_eval_table(r)]
    return "\n".join(parts)


def write_summary(eval_dir: Path) -> None:
    """Write the folder's summary.md (atomically): a row per evaluation result, then the
    lm-eval tables, each part only when the folder has such results."""
    title = f"Evaluations of {eval_dir.parent.name}"
    results, lm_eval = read_results(eval_dir), read_lm_eval_results(eval_dir)
    text = summary_markdown(title, results) if results or not lm_eval else f"# {title}\n"
    if lm_eval:
        text += "\n" + lm_eval_markdown(lm_eval)
    write_text_atomic(eval_dir / SUMMARY, text)


def write_reports(result: dict, out: Path) -> None:
    """Write result as JSON at `out`, its Markdown table beside it (`.md`), and the folder's
    summary.md over all its results; each file atomically (pipeline.files)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), checkpoint_markdown(out.stem, result))
    write_summary(out.parent)


def keep_earlier_lm_eval_tasks(record: dict, out: Path) -> dict:
    """record, plus the tasks of an earlier lm-eval record of the same checkpoint (the JSON at
    `out`: same folder, step and model sha256) that this one did not run; a task run again
    replaces its earlier entry."""
    try:
        earlier = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return record
    key = ("checkpoint", "step", "model_sha256")
    if not isinstance(earlier, dict) or [earlier.get(k) for k in key] != [record[k] for k in key]:
        return record
    kept = {t: e for t, e in earlier.get("tasks", {}).items() if t not in record["tasks"]}
    return {**record, "tasks": kept | record["tasks"]}


def write_lm_eval_report(record: dict, eval_dir: Path, name: str) -> Path:
    """Write an lm-eval record as `<eval_dir>/<name>.lm_eval.json` (keeping the tasks of an
    earlier record of the same checkpoint, see keep_earlier_lm_eval_tasks) and the folder's
    summary.md, atomically; returns the JSON's path."""
    out = make_folder(eval_dir, "evaluation folder", "checkpoint") / f"{name}{LM_EVAL}"
    write_json_atomic(out, keep_earlier_lm_eval_tasks(record, out))
    write_summary(eval_dir)
    return out


# --------------------------------------------------------------------------- terminal


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
