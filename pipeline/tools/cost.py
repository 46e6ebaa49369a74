"""Wall time and cost of a token budget, from a throughput given or measured by a training run.

Nothing runs at import time.
"""

from __future__ import annotations

import os
import statistics

from pipeline.errors import ConfigError, DataError
from pipeline.training.runlog import metrics_path, read_records


def estimate_cost(
    total_tokens: int, tokens_per_s: float, num_gpus: int, price_per_gpu_hour: float
) -> dict:
    """Wall time and cost of training on total_tokens tokens.

    tokens_per_s is the whole job's throughput (all GPUs together), as training logs it:
    `tokens_per_s` of the "train" records of runs/<name>/metrics.jsonl. Returns wall_s
    (seconds), wall_h (hours), gpu_hours (wall_h·num_gpus) and cost (gpu_hours ·
    price_per_gpu_hour, in the price's currency). Only training steps count: evaluation,
    checkpoints and start-up come on top. Raises ConfigError (a ValueError) for non-positive
    inputs.
    """
    if total_tokens <= 0 or tokens_per_s <= 0 or num_gpus < 1 or price_per_gpu_hour < 0:
        raise ConfigError(
            "need total_tokens > 0, tokens_per_s > 0, num_gpus >= 1 and price_per_gpu_hour >= 0"
            f" (got {total_tokens}, {tokens_per_s}, {num_gpus}, {price_per_gpu_hour})"
        )
    wall_s = total_tokens / tokens_per_s
    wall_h = wall_s / 3600
    gpu_hours = wall_h * num_gpus
    return {
        "wall_s": wall_s,
        "wall_h": wall_h,
        "gpu_hours": gpu_hours,
        "cost": gpu_hours * price_per_gpu_hour,
    }


def measured_tokens_per_s(metrics: str | os.PathLike, skip_first: int = 10) -> float:
    """Median tokens/s (whole job) of the "train" records of a metrics.jsonl written by
    training (or of a run folder's), after the first skip_first of them (compilation and
    warm-up make the first steps slow). Raises DataError when the file is missing, or when no
    train record is left."""
    path = metrics_path(metrics)
    try:
        records = read_records(path, "train")
    except FileNotFoundError:
        raise DataError(f"{path} not found: pass runs/<run_name>/metrics.jsonl") from None
    rates = [float(r["tokens_per_s"]) for r in records if r.get("tokens_per_s") is not None]
    if len(rates) <= skip_first:
        raise DataError(
            f"{path} has {len(rates)} train record(s) with tokens_per_s, none after the first "
            f"{skip_first} that are skipped: train longer or lower skip_first"
        )
    return statistics.median(rates[skip_first:])
