"""Plan a run before launching it: fit the micro-batch to GPU memory, estimate wall time and cost.

`python -m pipeline.plan memory ...` prints an analytic estimate of the memory per GPU,
`python -m pipeline.plan max-batch ...` finds the largest micro-batch that trains on this GPU
(by trying the run's real training steps, its recipe and runtime settings: pipeline.tools.probe;
the estimate where there is no CUDA), and
`python -m pipeline.plan cost ...` turns a token budget and a measured throughput into hours and
money. The estimate is `pipeline.tools.memory_estimate`, the measurement `pipeline.tools.probe`, the
cost `pipeline.tools.cost`; this module is the command line and the advice it prints. Everything
here is importable; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.config import TrainConfig
from pipeline.config.cli import compose_train
from pipeline.errors import ArgumentParser, ConfigError
from pipeline.model import PRESETS, ModelConfig
from pipeline.tools.cost import estimate_cost, measured_tokens_per_s
from pipeline.tools.memory_estimate import (
    FIT_MARGIN,
    GIB,
    PRECISION_BYTES,
    count_params,
    estimate_memory,
    largest_by_gpu,
    largest_power_of_two_fitting,
    memory_table,
)
from pipeline.tools.probe import RunProbe, find_max_micro_batch


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
        cfg,
        args.micro_batch_size,
        block,
        args.precision,
        args.world_size,
        args.sharded,
        args.optimizer,
    )
    layout = "FSDP full shard" if args.sharded else "data parallel"
    print(
        f"{args.model}: {count_params(cfg):,} parameters | block {block} | {args.precision} | "
        f"{args.optimizer} | {args.world_size} GPU(s), {layout} | estimated peak GiB per GPU "
        "(eager; excludes the CUDA context and fragmentation)"
    )
    print(table)
    if not args.sharded:
        fits = largest_by_gpu(cfg, block, args.precision, args.optimizer)
        print(
            f"largest power-of-two micro_batch_size by GPU memory (estimate within "
            f"{FIT_MARGIN:.0%} of the memory less 1 GiB): "
            + " | ".join(f"{gb} GB: {b or 'none'}" for gb, b in fits.items())
        )


def max_batch_config(args: argparse.Namespace) -> TrainConfig:
    """The run max-batch probes: conf/train.yaml with --experiment (or --model, gpt2 without
    either), --optimizer, --precision, --block-size, --no-compile and the Hydra overrides
    given after them (e.g. runtime.activation_checkpointing=true). Raises ConfigError."""
    overrides = [f"experiment={args.experiment}"] if args.experiment else []
    if args.model or not args.experiment:
        overrides.append(f"model={args.model or 'gpt2'}")
    overrides += [f"optim={args.optimizer}"] if args.optimizer else []
    overrides += [f"runtime.precision={args.precision}"] if args.precision else []
    overrides += [f"data.block_size={args.block_size}"] if args.block_size else []
    overrides += [] if args.compile else ["runtime.compile=false"]
    return compose_train(overrides + list(args.overrides))


def _precision(cfg: TrainConfig) -> str:
    """The run's precision on a GPU (auto: bf16), for the estimate."""
    return "bf16" if cfg.runtime.precision == "auto" else cfg.runtime.precision


def _measure_max_batch(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """find_max_micro_batch over the run's real training steps (RunProbe) on the current CUDA
    device, from the estimate's largest power of two; prints each attempt and the result."""
    probe = RunProbe.build(cfg, data_parallel=args.gpus > 1 and not cfg.runtime.fsdp)
    device, block, peaks = probe.device, cfg.block_size, {}
    total = torch.cuda.get_device_properties(device).total_memory
    start = largest_power_of_two_fitting(
        cfg.model, block, total, _precision(cfg), high=args.high, optimizer=cfg.optim.name
    )
    layout = (
        "FSDP (one shard here)" if cfg.runtime.fsdp else ("DDP" if args.gpus > 1 else "one GPU")
    )
    print(
        f"probing {cfg.model.n_layer} layers x {cfg.model.n_embd} | block {block} | "
        f"{_precision(cfg)} | {cfg.optim.name} | {layout} | activation checkpointing "
        f"{cfg.runtime.activation_checkpointing} | loss {cfg.runtime.loss_impl} | compile "
        f"{probe.compiled}; starting at the estimate, {start or 1}",
        flush=True,
    )

    def try_step(b: int) -> bool:
        began = time.perf_counter()
        fits = probe.fits(b, peaks)
        shown = f"fits, peak {peaks[b] / GIB:.2f} GiB" if fits else "out of memory"
        print(f"micro_batch_size={b}: {shown} ({time.perf_counter() - began:.0f} s)", flush=True)
        return fits

    best = find_max_micro_batch(try_step, args.low, args.high, start=start or args.low)
    if best == 0:
        raise ConfigError(f"micro_batch_size={args.low} does not fit on {device}")
    estimate = estimate_memory(cfg.model, best, block, _precision(cfg))["total"]
    print(
        f"largest micro-batch that trains on {torch.cuda.get_device_name(device)}: {best} "
        f"(measured peak {peaks[best] / GIB:.2f} of {total / GIB:.2f} GiB; "
        f"estimate {estimate / GIB:.2f} GiB)"
    )
    return best


def _estimate_max_batch(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """The largest power-of-two micro-batch whose estimate fits in --memory-gib; prints it."""
    block, precision = cfg.block_size, _precision(cfg)
    best = largest_power_of_two_fitting(
        cfg.model, block, args.memory_gib * GIB, precision, high=args.high, optimizer=cfg.optim.name
    )
    if best == 0:
        raise ConfigError(f"even micro_batch_size=1 exceeds {args.memory_gib} GiB")
    estimate = estimate_memory(cfg.model, best, block, precision)["total"]
    print(
        f"no CUDA measurement, estimate only: largest power-of-two micro-batch within "
        f"{args.memory_gib} GiB is {best} (estimated peak {estimate / GIB:.2f} GiB)"
    )
    return best


def run_max_batch(args: argparse.Namespace) -> None:
    cfg = max_batch_config(args)
    if torch.cuda.is_available() and not args.estimate and not cfg.runtime.cpu:
        best = _measure_max_batch(cfg, args)
    else:
        best = _estimate_max_batch(cfg, args)
    print(f"override: trainer.micro_batch_size={best}")
    tokens = args.tokens_per_step or cfg.trainer.tokens_per_step
    print(batch_hint(best, cfg.block_size, args.gpus, tokens))


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
    memory.add_argument("--model", default="gpt2", help=f"preset: {', '.join(PRESETS)}")
    memory.add_argument("--block-size", type=int, help="tokens per sequence (model's default)")
    memory.add_argument("--precision", choices=sorted(PRECISION_BYTES), default="bf16")
    memory.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    max_batch.add_argument("--experiment", help="the run's recipe (conf/experiment/NAME.yaml)")
    max_batch.add_argument("--model", help=f"preset (the experiment's; gpt2): {', '.join(PRESETS)}")
    max_batch.add_argument("--block-size", type=int, help="tokens per sequence (the run's)")
    max_batch.add_argument("--precision", choices=sorted(PRECISION_BYTES), help="(the run's)")
    max_batch.add_argument("--optimizer", choices=["adamw", "muon"], help="(the run's)")
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
    max_batch.add_argument("--tokens-per-step", type=int, help="for the hint (the run's)")
    max_batch.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the run, e.g. "
        "runtime.activation_checkpointing=true runtime.fsdp=true",
    )
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
