"""metrics.jsonl, the record of a training run: its name, its rows and its one reader.

`pipeline.training.reporter.Reporter` writes `<run_dir>/metrics.jsonl` on the main process: one
JSON object a line, appended and flushed as training goes, `{"kind": KIND, "step": STEP, ...}`
with STEP the optimizer step (from 1) it was recorded at. The kinds and their fields:

- train: every trainer.log_interval steps, the last and a stopping one: loss (nats/token) and
  grad_norm, means over the finite steps since the previous train record; lr (of this step);
  tokens_per_s (the whole job), tokens_per_s_per_gpu, mfu (0 to 1; null where the device's
  peak is unknown) and step_time_s (seconds, mean), over those steps; tokens_seen; on CUDA
  peak_memory_gib (torch.cuda.max_memory_allocated of rank 0 so far, GiB)
- val: loss (nats/token), perplexity (exp(loss)), tokens_seen
- skip: a step whose loss or gradient norm was not finite, its update skipped: loss, grad_norm
  (NaN or ±Infinity, as Python's json writes them)
- hellaswag: acc, acc_norm (0 to 1), n (items scored), tokens_seen

A process killed while writing can leave a last line without its newline: `read_records` skips
it, and `truncate` (a resumed run) drops it with every record of the steps to be redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import DataError
from pipeline.files import write_text_atomic

METRICS = "metrics.jsonl"
"""File name of the record, inside the run folder."""
KINDS = ("train", "val", "skip", "hellaswag")
"""Row kinds, as written by Reporter.train_step, val_step and log."""


def metrics_path(path: str | os.PathLike) -> Path:
    """`path` itself when it is a file or names one (ends in .jsonl), else the metrics.jsonl of
    the run folder `path`."""
    path = Path(path)
    return path if path.is_file() or path.suffix == ".jsonl" else path / METRICS


def _complete_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of each newline-terminated, non-blank line of a metrics.jsonl: a
    last line cut off by a kill is left out. Raises FileNotFoundError when there is none."""
    lines = metrics_path(path).read_text().split("\n")[:-1]  # [-1]: "" or a cut-off line
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def _parse(line: str, where: Path, number: int) -> dict:
    """One line as a record. Raises DataError naming the file and line when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "kind" not in record:
        raise DataError(f"{where}, line {number}: not a metrics record: is it a metrics.jsonl?")
    return record


def read_records(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (or of a run folder's), in the order written; only those
    of `kind` when given. Complete lines only: a last line cut off by a kill is skipped.
    Raises FileNotFoundError when the file is missing, DataError for a line that is not a
    record."""
    where = metrics_path(path)
    records = [_parse(line, where, n) for n, line in _complete_lines(where)]
    return [r for r in records if kind is None or r["kind"] == kind]


def truncate(path: str | os.PathLike, resume_step: int) -> None:
    """Keep only the complete records of steps before `resume_step`, rewritten atomically, so
    a run resumed at that step neither repeats steps nor appends to a cut-off line. A missing
    file is left missing."""
    where = metrics_path(path)
    if not where.is_file():
        return
    lines = _complete_lines(where)
    kept = [line for n, line in lines if _parse(line, where, n).get("step", 0) < resume_step]
    write_text_atomic(where, "".join(line + "\n" for line in kept))
