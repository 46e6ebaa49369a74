"""The loader benchmark: batches/s of `TrainLoader.next_batch` against what a step consumes.

On the device training uses (CUDA when available); the consumers are the training runs
measured by the train benchmark and a derived target for GPT-2 124M on one H100.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.loader import TrainLoader
from pipeline.data.shards import open_split
from pipeline.model import PRESETS
from pipeline.tools.bench.prepare import manifest_totals
from pipeline.tools.bench.train import TrainResult
from pipeline.tools.render import fmt_n, table

GPU_TOKENS_PER_S = 500_000
"""Training throughput targeted for the 124M model on one H100 (tokens/s): a target, not a
measurement, used to derive the batches/s the loader must supply on such a GPU."""
LOADER_SHAPES = ((16, 1024), (16, 256))
"""(micro_batch_size, block_size) read by the loader benchmark: GPT-2's and the tiny model's."""


@dataclass
class LoaderRate:
    """next_batch throughput for one (micro_batch_size, block_size)."""

    micro_batch_size: int
    block_size: int
    device: str
    rounds_batches_per_s: list[float]

    @property
    def batches_per_s(self) -> float:
        return statistics.median(self.rounds_batches_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.batches_per_s * self.micro_batch_size * self.block_size


def time_next_batch(loader: TrainLoader, seconds: float, warmup: int = 5) -> float:
    """Batches/s of loader.next_batch() over at least `seconds` after `warmup` batches."""
    for _ in range(warmup):
        loader.next_batch()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        count += 1
    if loader.device.type == "cuda":  # copies to the GPU are asynchronous
        torch.cuda.synchronize(loader.device)
    return count / (time.perf_counter() - start)


def bench_loader(
    shard_dir: Path,
    shapes: tuple[tuple[int, int], ...] = LOADER_SHAPES,
    rounds: int = 3,
    seconds: float = 1.0,
) -> list[LoaderRate]:
    """next_batch batches/s for each (micro_batch_size, block_size) over the train split,
    on the device training uses (cuda if available), rounds of at least `seconds` each."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split = open_split(shard_dir, "train", PRESETS["gpt2"].vocab_size)
    rates = []
    for b, t in shapes:
        loader = TrainLoader(split, t, b, device=device, vocab_size=PRESETS["gpt2"].vocab_size)
        measured = [time_next_batch(loader, seconds) for _ in range(rounds)]
        rates.append(LoaderRate(b, t, device, measured))
        print(f"loader {b} x {t}: {statistics.median(measured):,.0f} batches/s", flush=True)
    return rates


@dataclass(frozen=True)
class Consumer:
    """What a training step takes from the loader."""

    micro_batch_size: int
    block_size: int
    batches_per_s: float
    label: str


def consumers(trains: list[TrainResult]) -> list[Consumer]:
    """The GPU target (derived, not measured) and every measured training run: micro-batches
    per second a step consumes (grad_accum_steps / step time; 1 micro-batch per step here)."""
    b, t = LOADER_SHAPES[0]
    gpu = Consumer(
        b,
        t,
        GPU_TOKENS_PER_S / (b * t),
        f"124M on one H100 at ~{GPU_TOKENS_PER_S:,} tokens/s: derived from the target, "
        "not measured",
    )
    measured = [
        Consumer(
            r.micro_batch_size,
            r.block_size,
            1 / r.step_time_s,
            f"{r.model}, compile {'on' if r.compile else 'off'}, {r.device}: measured",
        )
        for r in trains
    ]
    return [gpu, *measured]


LOADER_COLUMNS = [
    "micro-batch B × T",
    "loader batches/s",
    "loader tokens/s",
    "consumer",
    "consumer batches/s",
    "loader / consumer",
]


def render_loader(rates: list[LoaderRate], trains: list[TrainResult], shard_dir: str) -> str:
    """The loader section: batches/s against what each training step consumes."""
    rows = []
    for rate in rates:
        shape = (rate.micro_batch_size, rate.block_size)
        matched = [c for c in consumers(trains) if (c.micro_batch_size, c.block_size) == shape]
        loader = [f"{shape[0]} × {shape[1]}", fmt_n(rate.batches_per_s), fmt_n(rate.tokens_per_s)]
        rows += [
            [
                *loader,
                c.label,
                fmt_n(c.batches_per_s),
                f"{rate.batches_per_s / c.batches_per_s:,.0f}×",
            ]
            for c in matched
        ] or [[*loader, "no training step measured at this size", "n/a", "n/a"]]
    _, tokens = manifest_totals(Path(shard_dir))
    device = rates[0].device if rates else "cpu"
    return "\n".join(
        [
            "### loader: batches from shards",
            "",
            f"`TrainLoader.next_batch()` on the train split of the shards prepared above "
            f"({tokens:,} tokens in all), device {device}, rank 0 of 1: 5 warm-up batches, then "
            f"batches for at least the set time; rounds: {len(rates[0].rounds_batches_per_s)}, "
            "median. A training step consumes grad_accum_steps micro-batches (1 in the measured "
            "runs below).",
            "",
            table(LOADER_COLUMNS, rows),
        ]
    )
