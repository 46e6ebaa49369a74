"""The train benchmark: step time, tokens/s, MFU and peak memory of short training runs.

Each run is `pipeline.training.loop.train` in a fresh process (its own empty torch.compile
cache, so compilation is timed cold), read back from its metrics.jsonl; torch.compile off and
on, the settings alternating. Times in seconds, memory in bytes.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
    TrainerConfig,
)
from pipeline.model import GPT, PRESETS
from pipeline.tools.bench.child import run_child
from pipeline.tools.host import peak_rss_self
from pipeline.tools.render import fmt_mib, fmt_n, fmt_s, table
from pipeline.training.runlog import read_records


@dataclass
class TrainResult:
    """Short pipeline.training.loop.train runs of one setting, each in a fresh process. Times in
    seconds, memory in bytes."""

    model: str
    params: int
    flops_per_token: int
    micro_batch_size: int
    block_size: int
    compile: bool
    device: str
    precision: str
    warmup_steps: int
    step_times_s: list[list[float]]
    """Per run: step_time_s of every step, from metrics.jsonl, in step order."""
    mfu_values: list[list[float | None]]
    """Per run: mfu of every step (None without a known peak)."""
    peak_rss: int
    """Largest peak RSS of the training processes (`peak_rss_self`)."""
    cuda_peak: int | None
    """Largest torch.cuda.max_memory_allocated (None on CPU)."""
    wall_s: float
    """Wall time of the train() calls (set-up, steps, final checkpoint), summed."""
    compile_mode: str = "default"
    """torch.compile's mode when compiled."""
    loss_impl: str = "chunked"
    """runtime.loss_impl of the runs."""

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.block_size

    @property
    def measured_s(self) -> list[float]:
        """Step times after each run's warm-up steps."""
        return [t for run in self.step_times_s for t in run[self.warmup_steps :]]

    @property
    def step_time_s(self) -> float:
        """Median step time after the warm-up steps, over all runs."""
        return statistics.median(self.measured_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float | None:
        values = [m for run in self.mfu_values for m in run[self.warmup_steps :] if m is not None]
        return statistics.median(values) if values else None

    @property
    def first_step_s(self) -> float:
        """Median over runs of the first step's time."""
        return statistics.median(run[0] for run in self.step_times_s)

    @property
    def warmup_overhead_s(self) -> float:
        """Median over runs of the warm-up steps' time beyond as many steady-state steps:
        compilation when compiled."""
        w, steady = self.warmup_steps, self.step_time_s
        return statistics.median(sum(run[:w]) - len(run[:w]) * steady for run in self.step_times_s)


def pool_runs(runs: list[TrainResult]) -> TrainResult:
    """Runs of one setting as one TrainResult: steps pooled, the largest memory peaks."""
    cuda = [r.cuda_peak for r in runs if r.cuda_peak is not None]
    return replace(
        runs[0],
        step_times_s=[t for r in runs for t in r.step_times_s],
        mfu_values=[m for r in runs for m in r.mfu_values],
        peak_rss=max(r.peak_rss for r in runs),
        cuda_peak=max(cuda) if cuda else None,
        wall_s=sum(r.wall_s for r in runs),
    )


def train_config(params: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a benchmark run: grad_accum_steps 1, no validation, no samples, a
    checkpoint only at the end, metrics every step."""
    b, t = params["micro_batch_size"], params["block_size"]
    return TrainConfig(
        model=replace(PRESETS[params["model"]]),
        data=DataConfig(shard_dir=params["shard_dir"], block_size=t),
        optim=OptimConfig(warmup_steps=1),
        trainer=TrainerConfig(
            run_name="bench",
            runs_dir=params["runs_dir"],
            tokens_per_step=b * t,
            micro_batch_size=b,
            max_steps=params["steps"],
            log_interval=1,
        ),
        eval=EvalConfig(tokens=0, sample_tokens=0),
        checkpoint=CheckpointConfig(interval=0, resume="never"),
        runtime=RuntimeConfig(
            compile=params["compile"],
            compile_mode=params["compile_mode"],
            peak_flops=params["peak_flops"],
            loss_impl=params.get("loss_impl", "chunked"),
        ),
    )


def train_child(params: dict[str, Any]) -> dict[str, Any]:
    # Imported here: the prepare child's memory should hold only what prepare imports.
    from accelerate.state import AcceleratorState

    from pipeline.training.loop import train

    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(train_config(params))
    return {
        "wall_s": time.perf_counter() - start,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": {"no": "fp32"}.get(mp := str(AcceleratorState().mixed_precision), mp),
        "peak_rss": peak_rss_self(),
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
    }


def train_in_child(params: dict[str, Any], work: Path, warmup_steps: int) -> TrainResult:
    """Train in a fresh process (with its own empty torch.compile cache, so compilation is
    timed cold) and read its metrics.jsonl."""
    runs = work / f"train_{'compiled' if params['compile'] else 'eager'}_{params['model']}"
    cache = {
        "TORCHINDUCTOR_CACHE_DIR": str(runs / "inductor_cache"),
        "TRITON_CACHE_DIR": str(runs / "triton_cache"),
    }
    child = run_child(train_child, {**params, "runs_dir": str(runs)}, env=cache)
    records = sorted(read_records(runs / "bench", "train"), key=lambda r: r["step"])
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        model = GPT(PRESETS[params["model"]])
    shutil.rmtree(runs, ignore_errors=True)
    return TrainResult(
        model=params["model"],
        params=model.num_params(),
        flops_per_token=model.flops_per_token(params["block_size"]),
        micro_batch_size=params["micro_batch_size"],
        block_size=params["block_size"],
        compile=params["compile"],
        compile_mode=params["compile_mode"],
        loss_impl=params.get("loss_impl", "chunked"),
        precision=child.pop("precision"),
        warmup_steps=warmup_steps,
        step_times_s=[[r["step_time_s"] for r in records]],
        mfu_values=[[r.get("mfu") for r in records]],
        **child,
    )


def bench_train(
    shard_dir: Path,
    work: Path,
    model: str = "tiny",
    micro_batch_size: int = 16,
    block_size: int = 256,
    warmup_steps: int = 2,
    steps: int = 8,
    compile_modes: tuple[bool, ...] = (False, True),
    peak_flops: float | None = None,
    repeats: int = 1,
    compile_mode: str = "default",
) -> list[TrainResult]:
    """One TrainResult per torch.compile setting: `repeats` runs of each, the settings
    alternating, of warmup_steps + steps optimizer steps of micro_batch_size x block_size
    tokens each (one micro-batch per step); compiled runs use compile_mode."""
    runs: dict[bool, list[TrainResult]] = {mode: [] for mode in compile_modes}
    for compile_model in [mode for _ in range(repeats) for mode in compile_modes]:
        params = {
            "model": model,
            "shard_dir": str(shard_dir),
            "micro_batch_size": micro_batch_size,
            "block_size": block_size,
            "steps": warmup_steps + steps,
            "compile": compile_model,
            "compile_mode": compile_mode,
            "peak_flops": peak_flops,
        }
        result = train_in_child(params, work, warmup_steps)
        print(
            f"train compile={compile_model}: {result.step_time_s:.3f} s/step, "
            f"{result.tokens_per_s:,.0f} tokens/s",
            flush=True,
        )
        runs[compile_model].append(result)
    return [pool_runs(r) for r in runs.values()]


# --------------------------------------------------------------------------- markdown


TRAIN_COLUMNS = [
    "torch.compile",
    "step time s",
    "range s",
    "tokens/s",
    "MFU",
    "model GFLOP/s",
    "first step s",
    "compile time s",
    "peak memory",
]


def _train_row(r: TrainResult) -> list[str]:
    measured = r.measured_s
    memory = fmt_mib(r.peak_rss) + " RSS"
    if r.cuda_peak is not None:
        memory = f"{fmt_mib(r.cuda_peak)} CUDA ({memory})"
    return [
        "on" if r.compile else "off",
        fmt_s(r.step_time_s),
        f"{fmt_s(min(measured))}–{fmt_s(max(measured))}",
        fmt_n(r.tokens_per_s),
        "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%",
        fmt_n(r.flops_per_token * r.tokens_per_s / 1e9),
        fmt_s(r.first_step_s),
        fmt_s(r.warmup_overhead_s) if r.compile else "n/a",
        memory,
    ]


def render_train(results: list[TrainResult], peak_flops: float | None) -> str:
    """The train section: one row per torch.compile setting."""
    r0 = results[0]
    memory = "`torch.cuda.max_memory_allocated` and " if r0.cuda_peak is not None else ""
    peak = f"peak {peak_flops:.3g} FLOP/s" if peak_flops else "the device's bf16 peak if known"
    return "\n".join(
        [
            "### train: optimizer steps",
            "",
            f"`pipeline.training.loop.train` in a fresh process per row: model `{r0.model}` "
            f"({r0.params:,} parameters), micro_batch_size {r0.micro_batch_size} × block "
            f"{r0.block_size} = {r0.tokens_per_step:,} tokens per step (grad_accum_steps 1), "
            f"precision {r0.precision}, device {r0.device}, torch.compile mode "
            f"`{r0.compile_mode}` where on; no validation. Step time: median "
            f"(and range) of `step_time_s` in metrics.jsonl over {len(r0.measured_s)} steps: "
            f"{len(r0.step_times_s)} runs per setting, the settings alternating, each of "
            f"{r0.warmup_steps} warm-up steps (left out) and "
            f"{len(r0.measured_s) // len(r0.step_times_s)} measured steps. First step and "
            "compile time (the warm-up steps' time beyond as many steady-state steps, from an "
            "empty compile cache): medians over the runs. "
            f"MFU against {peak} (n/a without one); model GFLOP/s = "
            f"{r0.flops_per_token:,} FLOPs/token (6·N + 12·L·C·T) × tokens/s. Peak memory: "
            f"{memory}the training process's peak RSS (VmHWM).",
            "",
            table(TRAIN_COLUMNS, [_train_row(r) for r in results]),
        ]
    )
