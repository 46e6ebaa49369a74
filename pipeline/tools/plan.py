"""Plan a run before launching it: fit the micro-batch to GPU memory, estimate wall time and cost.

`python -m pipeline.plan memory ...` prints an analytic estimate of the memory per GPU,
`python -m pipeline.plan max-batch ...` finds the largest micro-batch that trains on this GPU
(by trying real training steps; the estimate where there is no CUDA), and
`python -m pipeline.plan cost ...` turns a token budget and a measured throughput into hours and
money. Everything here is importable; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import OptimConfig, TrainerConfig
from pipeline.model import GPT, PRESETS, ModelConfig, loss_chunk_rows
from pipeline.training.optim import build_optimizer

GIB = 1 << 30
PRECISION_BYTES = {"bf16": 2, "fp32": 4}
"""Bytes per activation element for each trainer precision."""


# --------------------------------------------------------------------------- memory estimate


def count_params(cfg: ModelConfig) -> int:
    """Parameters of GPT(cfg), tied embedding counted once (as `GPT.num_params()`).

    Per block: c_attn 3C² + c_proj C² + c_fc 4C² + c_proj 4C² = 12C² weights, 9C linear biases
    and two LayerNorms (C gains, C biases each); plus wte V·C, wpe block_size·C and ln_f.
    """
    c = cfg.n_embd
    layer_norm = 2 * c if cfg.bias else c
    block = 12 * c * c + (9 * c if cfg.bias else 0) + 2 * layer_norm
    return cfg.embedding_rows * c + cfg.block_size * c + cfg.n_layer * block + layer_norm


def estimate_memory(
    model: ModelConfig,
    micro_batch_size: int,
    block_size: int,
    precision: str = "bf16",
    world_size: int = 1,
    sharded: bool = False,
    optimizer: str = "adamw",
    loss_impl: str = "chunked",
) -> dict[str, int]:
    """Estimated peak training memory of one GPU, in bytes, by component, and their total.

    An estimate for eager PyTorch, not a measurement: it leaves out the CUDA context and
    kernels (~0.5 GiB), the caching allocator's fragmentation, cuBLAS and attention workspaces,
    and FSDP's all-gathered unit buffers; torch.compile can need less (it recomputes cheap
    element-wise ops in the backward instead of keeping them). Components, with N = parameters
    (`count_params`), s = block_size, b = micro_batch_size, h = n_embd, L = n_layer,
    V = padded vocabulary:

    - parameters, gradients: 4·N each (fp32 weights and fp32 .grad; autocast keeps the master
      weights in fp32). Gradients persist across the micro-steps of an accumulation.
    - optimizer: 8·N, AdamW's exp_avg and exp_avg_sq in fp32. Parameters, gradients and
      optimizer states together are the 16 bytes/parameter of mixed-precision Adam (ZeRO,
      Rajbhandari et al. 2020). optimizer="muon": 4 bytes (one momentum buffer) for the
      12·L·h² block matrices Muon trains, 8 for the rest (AdamW).
    - autocast_weights: 2·(12·L·h² + V·h) with bf16, 0 with fp32: the bf16 copies of the matmul
      weights that autocast makes in the forward and the matmuls keep for the backward.
    - activations: L·34·s·b·h bytes for 16-bit activations (Korthikanti et al. 2022, "Reducing
      Activation Recomputation in Large Transformer Models", per-layer activation memory
      s·b·h·(34 + 5·a·s/h)) without its 5·a·s²·b attention-score term, which flash attention
      (SDPA) does not store (Dao et al. 2022); plus 4·s·b·h for the inputs of the final
      LayerNorm and of the output projection, 2 bytes each as in the paper. fp32 doubles both.
      Counting the tensors eager PyTorch saves on CPU gives ~37·s·b·h bytes per block with
      bf16 autocast (the residual stream and the LayerNorm inputs stay fp32), so the 16-bit
      figure is a little low, and ~64.5·s·b·h with fp32.
    - logits: the output layer and the loss. loss_impl="chunked" (the default; see
      pipeline.model.chunked_cross_entropy): 8·b·s·h + 8·V·h + c·V·k with
      c = min(loss_chunk_rows(V), b·s): the float32 input gradient (b·s·h) and weight gradient
      (V·h) computed in the forward, each held to the backward and scaled there into a copy,
      plus one chunk of logits at a time, k = 4 bytes in fp32 (float32 logits, softmaxed in
      place) or 8 with bf16 (the bf16 product, its float32 copy and the bf16 cast of its
      gradient), as measured by tests/test_plan.py. loss_impl="full": b·s·V·(p + 12), with
      p = 2 (bf16) or 4 (fp32) bytes: the (B, T, V)
      logits in the compute dtype, held through the backward; the float32 log-softmax that
      cross-entropy keeps (`logits.float()` is a no-op in fp32); and, at the peak in
      log-softmax's backward, two float32 (B, T, V) gradients.

    sharded=True (FSDP full shard, ZeRO stage 3) divides parameters, gradients, optimizer states
    and the autocast copies (FSDP keeps a bf16 copy of its own shard) by world_size; activations
    and logits are per GPU either way. The total is the peak of a micro-step after the first of
    a gradient accumulation, when gradients are held and activations are all saved.
    Raises ValueError for an unknown precision or sizes out of range.
    """
    _check_estimate_args(model, micro_batch_size, block_size, precision, world_size)
    if optimizer not in ("adamw", "muon") or loss_impl not in ("chunked", "full"):
        raise ValueError(
            f"cannot estimate memory: optimizer={optimizer!r} (adamw or muon), loss_impl="
            f"{loss_impl!r} (chunked or full)"
        )
    shards = world_size if sharded else 1
    n = count_params(model)
    h, s, b, v = model.n_embd, block_size, micro_batch_size, model.embedding_rows
    act = PRECISION_BYTES[precision]
    scale = act // 2  # 1 for 16-bit activations, 2 for fp32
    block_matrices = 12 * model.n_layer * h * h
    matmul_weights = block_matrices + v * h
    optimizer_bytes = 8 * n if optimizer == "adamw" else 8 * n - 4 * block_matrices
    if loss_impl == "full":
        logits = b * s * v * (act + 12)
    else:
        rows = min(loss_chunk_rows(v), b * s)
        logits = 8 * b * s * h + 8 * v * h + rows * v * (4 if act == 4 else 8)
    out = {
        "parameters": -(-4 * n // shards),
        "gradients": -(-4 * n // shards),
        "optimizer": -(-optimizer_bytes // shards),
        "autocast_weights": -(-2 * matmul_weights // shards) if precision == "bf16" else 0,
        "activations": scale * (34 * model.n_layer + 4) * s * b * h,
        "logits": logits,
    }
    out["total"] = sum(out.values())
    return out


def _check_estimate_args(
    model: ModelConfig, micro_batch_size: int, block_size: int, precision: str, world_size: int
) -> None:
    problems = list(model.problems())
    if precision not in PRECISION_BYTES:
        problems.append(f"precision={precision!r}: use one of {sorted(PRECISION_BYTES)}")
    if micro_batch_size < 1 or world_size < 1:
        problems.append(f"micro_batch_size={micro_batch_size}, world_size={world_size}: need >= 1")
    if not 1 <= block_size <= model.block_size:
        problems.append(
            f"block_size={block_size} must be between 1 and the model's block_size "
            f"{model.block_size}"
        )
    if problems:
        raise ValueError("cannot estimate memory:\n  " + "\n  ".join(problems))


def memory_table(
    model: ModelConfig,
    micro_batch_sizes: list[int],
    block_size: int,
    precision: str = "bf16",
    world_size: int = 1,
    sharded: bool = False,
    optimizer: str = "adamw",
) -> str:
    """The estimate of each micro-batch size as a text table, GiB per component and total."""
    rows = [
        estimate_memory(model, b, block_size, precision, world_size, sharded, optimizer)
        for b in micro_batch_sizes
    ]
    keys = list(rows[0])
    header = "micro_batch " + " ".join(f"{k:>{max(len(k), 8)}}" for k in keys)
    lines = [header]
    for b, row in zip(micro_batch_sizes, rows):
        cells = " ".join(f"{row[k] / GIB:>{max(len(k), 8)}.2f}" for k in keys)
        lines.append(f"{b:>11} {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- largest micro-batch


def find_max_micro_batch(try_step: Callable[[int], bool], low: int = 1, high: int = 1024) -> int:
    """The largest micro-batch size b in [low, high] with try_step(b) True, or 0 if try_step(low)
    is False. Assumes monotonicity (if b fits, every smaller size fits): doubles from low until a
    size fails or high is reached, then bisects between the last size that fit and the first
    that failed: at most 2·ceil(log2(high)) + 1 calls. Raises ValueError unless
    1 <= low <= high."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
    if not try_step(low):
        return 0
    fits, fails = low, None
    while fails is None and fits < high:
        candidate = min(2 * fits, high)
        if try_step(candidate):
            fits = candidate
        else:
            fails = candidate
    if fails is None:
        return fits  # high fits
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if try_step(middle):
            fits = middle
        else:
            fails = middle
    return fits


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def cuda_step_fits(
    model_cfg: ModelConfig,
    micro_batch_size: int,
    block_size: int,
    precision: str,
    compile: bool,
    device: torch.device | str,
    peaks: dict[int, int] | None = None,
    optimizer: str = "adamw",
) -> bool:
    """Whether training at micro_batch_size fits in the memory of CUDA device `device`.

    Builds GPT(model_cfg) and the real optimizer (`build_optimizer`, the default OptimConfig
    with name=optimizer: adamw, or muon + adamw) on the device and runs two optimizer steps of
    two micro-batches each, as training does with gradient accumulation (random tokens,
    block_size tokens per sequence; bf16 autocast when precision is "bf16"; torch.compile when
    compile). Returns False on CUDA out-of-memory, after
    freeing what the attempt allocated. On success, peaks[micro_batch_size] (when given) is set
    to torch.cuda.max_memory_allocated in bytes. Raises ValueError for a non-CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"cuda_step_fits needs a CUDA device, got {device} (CUDA available: "
            f"{torch.cuda.is_available()}); use estimate_memory without a GPU"
        )
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision={precision!r}: use one of {sorted(PRECISION_BYTES)}")
    _release_cuda_memory(compile)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        _train_steps(model_cfg, micro_batch_size, block_size, precision, compile, device,
                     optimizer=optimizer)  # fmt: skip
        fits = True
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
        if not _is_out_of_memory(error):
            raise
        fits = False
    if fits and peaks is not None:
        peaks[micro_batch_size] = torch.cuda.max_memory_allocated(device)
    _release_cuda_memory(compile)
    return fits


def _release_cuda_memory(compiled: bool) -> None:
    """Free an attempt's tensors (their frames are gone once the exception is) and compiled
    graphs, so the next attempt starts from an empty device and compiles for its own shapes."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _train_steps(
    model_cfg: ModelConfig,
    micro_batch_size: int,
    block_size: int,
    precision: str,
    compile: bool,
    device: torch.device,
    steps: int = 2,
    grad_accum: int = 2,
    optimizer: str = "adamw",
) -> None:
    """`steps` optimizer steps of `grad_accum` micro-batches, as pipeline.train runs them
    (the chunked loss, the model's default)."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    optim_cfg = OptimConfig(name=optimizer)
    optimizer = build_optimizer(model, optim_cfg, device.type)
    forward = torch.compile(model) if compile else model
    shape = (micro_batch_size, block_size + 1)
    for _ in range(steps):
        for _ in range(grad_accum):
            tokens = torch.randint(0, model_cfg.vocab_size, shape, device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                _, loss = forward(tokens[:, :-1], tokens[:, 1:])
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)


def largest_power_of_two_fitting(
    model: ModelConfig,
    block_size: int,
    memory_bytes: float,
    precision: str = "bf16",
    world_size: int = 1,
    sharded: bool = False,
    high: int = 1024,
    optimizer: str = "adamw",
) -> int:
    """The largest power of two b <= high whose estimated total fits in memory_bytes, or 0."""
    best, b = 0, 1
    while b <= high:
        est = estimate_memory(model, b, block_size, precision, world_size, sharded, optimizer)
        total = est["total"]
        if total > memory_bytes:
            break
        best, b = b, 2 * b
    return best


FIT_MARGIN = 0.9
"""Share of a GPU's memory the advice fills: the estimate leaves out the caching allocator's
fragmentation and workspaces, and counts 34 bytes per block element where eager bf16 saves ~37
(see estimate_memory), so a micro-batch estimated at the very limit would not train."""
GPU_MEMORY_GB = (24, 40, 48, 80)
"""Common GPU memory sizes (GB): RTX 3090/4090, A100 40GB, A6000/L40S, A100/H100 80GB."""


def largest_by_gpu(
    model: ModelConfig,
    block_size: int,
    precision: str = "bf16",
    optimizer: str = "adamw",
    gpus_gb: tuple[int, ...] = GPU_MEMORY_GB,
) -> dict[int, int]:
    """For each GPU size (GB), the largest power-of-two micro_batch_size whose estimated peak
    (estimate_memory, the chunked loss) fits in FIT_MARGIN of that many GiB less 1 GiB for the
    CUDA context (an 80 GB card leaves about 79 GiB to tensors); 0 = none."""
    return {
        gb: largest_power_of_two_fitting(
            model, block_size, FIT_MARGIN * (gb - 1) * GIB, precision, optimizer=optimizer
        )
        for gb in gpus_gb
    }


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


# --------------------------------------------------------------------------- time and cost


def estimate_cost(
    total_tokens: int, tokens_per_s: float, num_gpus: int, price_per_gpu_hour: float
) -> dict:
    """Wall time and cost of training on total_tokens tokens.

    tokens_per_s is the whole job's throughput (all GPUs together), as training logs it:
    `tokens_per_s` of the "train" records of runs/<name>/metrics.jsonl. Returns wall_s
    (seconds), wall_h (hours), gpu_hours (wall_h·num_gpus) and cost (gpu_hours ·
    price_per_gpu_hour, in the price's currency). Only training steps count: evaluation,
    checkpoints and start-up come on top. Raises ValueError for non-positive inputs.
    """
    if total_tokens <= 0 or tokens_per_s <= 0 or num_gpus < 1 or price_per_gpu_hour < 0:
        raise ValueError(
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


def measured_tokens_per_s(metrics_path: str | Path, skip_first: int = 10) -> float:
    """Median tokens/s (whole job) of the "train" records of a metrics.jsonl written by
    training, after the first skip_first of them (compilation and warm-up make the first steps
    slow). Raises FileNotFoundError, or ValueError when no train record is left."""
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass runs/<run_name>/metrics.jsonl")
    rates = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("kind") == "train" and record.get("tokens_per_s") is not None:
            rates.append(float(record["tokens_per_s"]))
    if len(rates) <= skip_first:
        raise ValueError(
            f"{path} has {len(rates)} train record(s) with tokens_per_s, none after the first "
            f"{skip_first} that are skipped: train longer or lower skip_first"
        )
    return statistics.median(rates[skip_first:])


# --------------------------------------------------------------------------- command line


def _preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise SystemExit(f"error: unknown model {name!r}: use one of {', '.join(PRESETS)}")
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
        raise SystemExit(f"error: micro_batch_size={args.low} does not fit on {device}")
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
        raise SystemExit(f"error: even micro_batch_size=1 exceeds {args.memory_gib} GiB")
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
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0]
    )
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
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as error:  # bad sizes, a missing or too short metrics file
        raise SystemExit(f"error: {error}") from None
