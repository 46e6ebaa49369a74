"""Plan a run before launching it: fit the micro-batch to GPU memory, estimate wall time and cost.

`python -m pipeline.plan memory ...` prints an analytic estimate of the memory per GPU,
`python -m pipeline.plan max-batch ...` finds the largest micro-batch that trains on this GPU
(by trying real training steps; the estimate where there is no CUDA), and
`python -m pipeline.plan cost ...` turns a token budget and a measured throughput into hours and
money. The estimate is `pipeline.tools.memory`, the measurement `pipeline.tools.probe`, the
cost `pipeline.tools.cost`; this module is the command line and the advice it prints. Everything
here is importable; nothing runs at import time.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.config import TrainerConfig
from pipeline.errors import ArgumentParser, ConfigError
from pipeline.model import PRESETS, ModelConfig
from pipeline.tools.cost import estimate_cost, measured_tokens_per_s
from pipeline.tools.memory import (
    FIT_MARGIN,
    GIB,
    PRECISION_BYTES,
    count_params,
    estimate_memory,
    largest_by_gpu,
    largest_power_of_two_fitting,
    memory_table,
)
from pipeline.tools.probe import cuda_step_fits, find_max_micro_batch


def batch_hint(micro_batch_size: int, block_size: int, num_gpus: int, tokens_per_step: int) -> str:
    """How micro_batch_size combines with trainer.tokens_per_step, which must be a multiple of
    micro_batch_size·block_size·num_gpus tokens (TrainConfig.problems)."""
    per_pass = micro_batch_size * block_size * num_gpus
    rule = (
        f"tokens_per_step must be a multiple of micro_batch_size·block_size·num_gpus = "
        f"{micro_batch_size}·{block_size}·{num_gpus} = {per_pass:,} tokens"
    )
    if tokens_per_step % per_pass == 0:
        accum = tokens_per_step // per_pass
        return f"{rule}: trainer.tokens_per_step={tokens_per_step} gives grad_accum_steps {accum}"
    fix = f"trainer.tokens_per_step={max(1, tokens_per_step // per_pass) * per_pass}"
    smaller = next(
        (
            m
            for m in range(micro_batch_size - 1, 0, -1)
            if tokens_per_step % (m * block_size * num_gpus) == 0
        ),
        None,
    )
    if smaller is not None:
        fix += f", or the largest micro-batch that divides it, trainer.micro_batch_size={smaller}"
    return f"{rule}; trainer.tokens_per_step={tokens_per_step} is not: use {fix}"


def _preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def run_memory(args: argparse.Namespace) -> None:
    cfg = _preset(args.model)
    block = args.block_size or cfg.block_size
    table = memory_table(
        cfg, args.micro_batch_size, block, args.precision, args.world_size, args.sharded,
        args.optimizer,
    )  # fmt: skip
    layout = "FSDP full shard" if args.sharded else "data parallel"
    print(
        f"{args.model}: {count_params(cfg):,} parameters | block {block} | {args.precision} | "
        f"{args.optimizer} | {args.world_size} GPU(s), {layout} | estimated peak GiB per GPU "
        "(eager; excludes the CUDA context and fragmentation)"
    )
    print(table)
    if not args.sharded:
        fits = largest_by_gpu(cfg, block, args.precision, args.optimizer)
        print(f"largest power-of-two micro_batch_size by GPU memory (estimate within "
              f"{FIT_MARGIN:.0%} of the memory less 1 GiB): "
              + " | ".join(f"{gb} GB: {b or 'none'}" for gb, b in fits.items()))  # fmt: skip


def _measure_max_batch(cfg: ModelConfig, block: int, args: argparse.Namespace) -> int:
    """find_max_micro_batch over real training steps on the current CUDA device; prints each
    attempt and the result."""
    device = torch.device("cuda", torch.cuda.current_device())
    peaks: dict[int, int] = {}

    def try_step(b: int) -> bool:
        fits = cuda_step_fits(cfg, b, block, args.precision, args.compile, device, peaks=peaks,
                              optimizer=args.optimizer)  # fmt: skip
        shown = f"fits, peak {peaks[b] / GIB:.2f} GiB" if fits else "out of memory"
        print(f"micro_batch_size={b}: {shown}", flush=True)
        return fits

    best = find_max_micro_batch(try_step, args.low, args.high)
    if best == 0:
        raise ConfigError(f"micro_batch_size={args.low} does not fit on {device}")
    total = torch.cuda.get_device_properties(device).total_memory
    estimate = estimate_memory(cfg, best, block, args.precision)["total"]
    print(
        f"largest micro-batch that trains on {torch.cuda.get_device_name(device)}: {best} "
        f"(measured peak {peaks[best] / GIB:.2f} of {total / GIB:.2f} GiB; "
        f"estimate {estimate / GIB:.2f} GiB)"
    )
    return best


def _estimate_max_batch(cfg: ModelConfig, block: int, args: argparse.Namespace) -> int:
    """The largest power-of-two micro-batch whose estimate fits in --memory-gib; prints it."""
    best = largest_power_of_two_fitting(
        cfg, block, args.memory_gib * GIB, args.precision, high=args.high, optimizer=args.optimizer
    )
    if best == 0:
        raise ConfigError(f"even micro_batch_size=1 exceeds {args.memory_gib} GiB")
    estimate = estimate_memory(cfg, best, block, args.precision)["total"]
    print(
        f"no CUDA measurement, estimate only: largest power-of-two micro-batch within "
        f"{args.memory_gib} GiB is {best} (estimated peak {estimate / GIB:.2f} GiB)"
    )
    return best


def run_max_batch(args: argparse.Namespace) -> None:
    cfg = _preset(args.model)
    block = args.block_size or cfg.block_size
    if torch.cuda.is_available() and not args.estimate:
        best = _measure_max_batch(cfg, block, args)
    else:
        best = _estimate_max_batch(cfg, block, args)
    print(f"override: trainer.micro_batch_size={best}")
    print(batch_hint(best, block, args.gpus, args.tokens_per_step))


def run_cost(args: argparse.Namespace) -> None:
    rate = args.tokens_per_s
    if args.metrics is not None:
        rate = measured_tokens_per_s(args.metrics, args.skip_first)
        print(f"measured throughput: {rate:,.0f} tokens/s (median of {args.metrics})")
    cost = estimate_cost(int(args.tokens), rate, args.gpus, args.price)
    print(
        f"{int(args.tokens):,} tokens at {rate:,.0f} tokens/s: wall time {cost['wall_s']:,.0f} s "
        f"= {cost['wall_h']:,.2f} h ({cost['wall_h'] / 24:,.2f} days), training steps only"
    )
    print(
        f"cost: {args.gpus} GPU(s) x {cost['wall_h']:,.2f} h = {cost['gpu_hours']:,.2f} GPU-hours "
        f"x {args.price:,.2f}/GPU-hour = {cost['cost']:,.2f}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser("memory", help="estimated peak memory per GPU")
    max_batch = commands.add_parser("max-batch", help="largest micro-batch that fits")
    for sub in (memory, max_batch):
        sub.add_argument("--model", default="gpt2", help=f"preset: {', '.join(PRESETS)}")
        sub.add_argument("--block-size", type=int, help="tokens per sequence (model's default)")
        sub.add_argument("--precision", choices=sorted(PRECISION_BYTES), default="bf16")
        sub.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    memory.add_argument("--micro-batch-size", type=int, nargs="+", default=[8, 16, 32, 64])
    memory.add_argument("--world-size", type=int, default=1, help="GPUs of the job")
    memory.add_argument("--sharded", action="store_true", help="FSDP full shard over them")
    memory.set_defaults(run=run_memory)
    max_batch.add_argument(
        "--no-compile", dest="compile", action="store_false", help="eager (training compiles)"
    )
    max_batch.add_argument("--estimate", action="store_true", help="estimate even with CUDA")
    max_batch.add_argument("--memory-gib", type=float, default=80.0, help="for the estimate")
    max_batch.add_argument("--low", type=int, default=1, help="smallest micro-batch to try")
    max_batch.add_argument("--high", type=int, default=1024, help="largest micro-batch to try")
    max_batch.add_argument("--gpus", type=int, default=1, help="GPUs of the job, for the hint")
    max_batch.add_argument("--tokens-per-step", type=int, default=TrainerConfig().tokens_per_step)
    max_batch.set_defaults(run=run_max_batch)
    cost = commands.add_parser("cost", help="wall time and cost of a token budget")
    cost.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 10e9")
    rate = cost.add_mutually_exclusive_group(required=True)
    rate.add_argument("--tokens-per-s", type=float, help="whole-job throughput, tokens/s")
    rate.add_argument("--metrics", help="runs/<name>/metrics.jsonl to take the median from")
    cost.add_argument("--skip-first", type=int, default=10, help="train records to skip")
    cost.add_argument("--gpus", type=int, required=True)
    cost.add_argument("--price", type=float, required=True, help="price per GPU-hour")
    cost.set_defaults(run=run_cost)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one command. Bad sizes and unusable metrics files raise ConfigError or DataError,
    which the entry point's guard prints as `error: ...` with exit code 2."""
    args = build_parser().parse_args(argv)
    args.run(args)
