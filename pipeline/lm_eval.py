"""Entry point: `python -m pipeline.lm_eval RUN_OR_CHECKPOINT [--tasks ...]`, EleutherAI's
lm-evaluation-harness on a checkpoint. See pipeline.evaluation.harness."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.errors import ArgumentParser, guard
from pipeline.evaluation.harness import DEFAULT_TASKS, run_lm_eval
from pipeline.evaluation.reports import SUMMARY, lm_eval_table


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _batch_size(text: str) -> int | str:
    return text if text.startswith("auto") else _positive(text)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m pipeline.lm_eval",
        description="Export a checkpoint with its tokenizer and score it with lm-evaluation-"
        "harness; results go to <run>/eval/<checkpoint>.lm_eval.json and summary.md.",
    )
    p.add_argument("checkpoint", help="runs/NAME (its newest checkpoint) or a step_* folder")
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated lm-eval task, group or tag names (globs allowed), task YAML files "
        "or folders of them (default: %(default)s)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of task YAML files whose tasks --tasks may name (repeatable)",
    )
    p.add_argument("--limit", type=_positive, help="at most N examples per task (a quick check)")
    p.add_argument("--num-fewshot", type=int, help="examples in the prompt (default: the task's)")
    p.add_argument("--batch-size", type=_batch_size, default=16, help="or auto (GPU); default 16")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; errors exit through pipeline.errors.guard (`error: ...`, 2)."""
    args = _parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    record, path = run_lm_eval(
        args.checkpoint,
        tasks,
        include=args.include,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"\n{record['checkpoint']} (step {record['step']})\n\n{lm_eval_table(record)}")
    print(f"wrote {path} and {path.parent / SUMMARY}")


if __name__ == "__main__":
    guard(main)()
