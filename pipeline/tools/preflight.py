"""`make preflight`: check a rented GPU machine in minutes, before paying for hours of training.

    python -m pipeline.preflight [--experiment gpt2_124m_10bt] [--gpus N] [--price 2.5]

Runs, in order, what applies to the machine (a CPU runs what needs no GPU and names the rest as
skipped):
- versions: python, torch, CUDA, the NVIDIA driver, the GPUs and their memory;
- bf16: whether the GPU computes in bfloat16 (Ampere or newer);
- attention: which scaled_dot_product_attention kernels take GPT-2's shapes (B × 12 heads ×
  1024 × 64, bf16, causal): flash or cuDNN, not only the slow math kernel;
- compile: a C compiler (Inductor and Triton build helpers with one) and torch.compile on the GPU;
- step: one bf16 training step of GPT-2 124M, compiled and eager: the same loss and gradient
  norm within tolerance;
- optimizers: one fused AdamW step and one Muon step over GPT-2 124M's parameters (ms);
- nccl: an all-reduce of 256 MiB across every visible GPU and its bus bandwidth (GB/s);
- recipe: 20 real training steps of the experiment on the GPUs (synthetic tokens, so no shards
  are needed yet): tokens/s, MFU, peak memory, and the time and cost of the whole run;
- disk: free space where shards and runs go against what the recipe needs, and write speed.

Each problem is one line `error: <check>: <what> — <what to do>` and exit code 2; otherwise a
markdown table for BENCHMARKS.md. Memory in bytes unless named, times in seconds.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config.cli import check_command_line
from pipeline.errors import ArgumentParser, ConfigError
from pipeline.model import GPT, PRESETS
from pipeline.tools.cost import estimate_cost, measured_tokens_per_s
from pipeline.tools.process import run_timed
from pipeline.tools.render import table
from pipeline.training.runlog import read_records

GIB = 2**30
RECIPE_TIMEOUT_S = 900
"""The recipe's steps, compile and start-up included, must end within this."""


@dataclass
class Check:
    """One line of the preflight table."""

    name: str
    status: str
    """ok, problem or skipped."""
    detail: str
    """The figures, or why it was skipped or failed."""
    fix: str = ""
    """What to do about a problem."""


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def problem(name: str, detail: str, fix: str) -> Check:
    return Check(name, "problem", detail, fix)


def skipped(name: str, why: str) -> Check:
    return Check(name, "skipped", why)


# --------------------------------------------------------------------------- the checks


def check_versions() -> Check:
    cuda = torch.version.cuda or "none (a CPU build of torch)"
    line = f"python {platform.python_version()}, torch {torch.__version__}, CUDA {cuda}"
    if not torch.cuda.is_available():
        return ok("versions", line + "; no CUDA device")
    driver = _nvidia_smi("driver_version") or "unknown"
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    names = ", ".join(f"{g.name} ({g.total_memory / GIB:.0f} GiB)" for g in gpus)
    return ok("versions", f"{line}, driver {driver}; {len(gpus)} GPU(s): {names}")


def _nvidia_smi(field: str) -> str | None:
    command = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"]
    out = run_timed(command, cwd=None, timeout_s=30)
    return out.stdout.splitlines()[0].strip() if out.ok and out.stdout else None


def check_bf16() -> Check:
    if not torch.cuda.is_available():
        return skipped("bf16", "no CUDA device")
    if torch.cuda.is_bf16_supported():
        return ok("bf16", "supported: runtime.precision=auto trains in bf16")
    return problem(
        "bf16",
        f"{torch.cuda.get_device_name()} has no bfloat16 support",
        "rent an Ampere or newer GPU (A100, H100, L4 ...), or train with "
        "runtime.precision=fp32 (slower, more memory)",
    )


def check_attention(micro_batch: int = 4) -> Check:
    if not torch.cuda.is_available():
        return skipped("attention", "no CUDA device")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(micro_batch, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    usable = []
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            usable.append(backend.name.lower())
        except RuntimeError:
            pass
    if {"flash_attention", "cudnn_attention"} & set(usable):
        return ok("attention", f"kernels that take GPT-2's shapes: {', '.join(usable)}")
    return problem(
        "attention",
        f"only {', '.join(usable) or 'no kernel'} takes GPT-2's shapes (bf16, head_dim 64, causal)",
        "use a torch build with flash attention for "
        "this GPU (make setup-gpu installs PyPI's CUDA build)",
    )


def check_compile() -> Check:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return problem(
            "compile",
            "no C compiler on PATH (Inductor and Triton need one)",
            "install one (apt-get install build-essential; make setup-gpu does), "
            "or train with runtime.compile=false",
        )
    if not torch.cuda.is_available():
        return skipped("compile", f"C compiler {compiler}; torch.compile on a GPU: no CUDA")
    start = time.perf_counter()
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x, approximate="tanh") * 2)
        fn(torch.randn(1024, device="cuda")).sum().item()
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain is the finding
        return problem(
            "compile",
            f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "train with runtime.compile=false, or fix the toolchain (a C compiler, Triton)",
        )
    return ok(
        "compile",
        f"C compiler {compiler}; a compiled kernel in {time.perf_counter() - start:.1f} s",
    )


def check_step(micro_batch: int = 4) -> Check:
    """One bf16 step of GPT-2 124M, eager against compiled: loss and gradient norm."""
    if not torch.cuda.is_available():
        return skipped("step", "no CUDA device")
    torch.manual_seed(0)
    model = GPT(PRESETS["gpt2"]).cuda()
    tokens = torch.randint(0, 50257, (micro_batch, 1025), device="cuda")
    figures = {}
    for name, forward in (("eager", model), ("compiled", torch.compile(model))):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = forward(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        figures[name] = (loss.item(), norm.item(), time.perf_counter() - start)
    (loss_e, norm_e, _), (loss_c, norm_c, first) = figures["eager"], figures["compiled"]
    detail = (
        f"loss eager {loss_e:.5f}, compiled {loss_c:.5f}; grad norm {norm_e:.4f}, "
        f"{norm_c:.4f}; first compiled step {first:.1f} s"
    )
    if abs(loss_c - loss_e) > 1e-2 * abs(loss_e) or abs(norm_c - norm_e) > 5e-2 * norm_e:
        return problem(
            "step", detail, "train with runtime.compile=false and report the torch version and GPU"
        )
    return ok("step", detail)


def check_optimizers() -> Check:
    if not torch.cuda.is_available():
        return skipped("optimizers", "no CUDA device")
    from pipeline.config import OptimConfig
    from pipeline.training.optim import build_optimizer

    model = GPT(PRESETS["gpt2"]).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = {}
    for name in ("adamw", "muon"):
        optimizers = build_optimizer(model, OptimConfig(name=name), "cuda")
        optimizers.step()  # warm-up: state allocation
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizers.step()
        torch.cuda.synchronize()
        times[name] = 1000 * (time.perf_counter() - start)
    if not all(p.isfinite().all() for p in model.parameters()):
        return problem("optimizers", "non-finite weights after a step", "report the versions")
    return ok(
        "optimizers",
        f"GPT-2 124M, one step: fused AdamW {times['adamw']:.1f} ms, "
        f"Muon + AdamW {times['muon']:.1f} ms",
    )


def check_nccl(gpus: int, work: Path, size_mib: int = 256) -> Check:
    if gpus < 2:
        return skipped("nccl", f"{gpus} GPU(s): an all-reduce needs two or more")
    code = (
        "import os, time, torch, torch.distributed as dist\n"
        "dist.init_process_group('nccl'); r = dist.get_rank(); torch.cuda.set_device(r)\n"
        f"x = torch.ones({size_mib} * 2**20 // 2, dtype=torch.bfloat16, device='cuda')\n"
        "for _ in range(3): dist.all_reduce(x)\n"
        "torch.cuda.synchronize(); t = time.perf_counter()\n"
        "for _ in range(10): dist.all_reduce(x)\n"
        "torch.cuda.synchronize(); s = (time.perf_counter() - t) / 10\n"
        "if r == 0: print('seconds', s)\n"
        "dist.destroy_process_group()\n"
    )
    script = work / "all_reduce.py"
    script.write_text(code)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    out = run_timed([*torchrun, f"--nproc_per_node={gpus}", str(script)], timeout_s=300)
    seconds = [
        float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("seconds ")
    ]
    if not out.ok or not seconds:
        return problem(
            "nccl",
            f"all-reduce across {gpus} GPUs failed ({out.why()}: {out.last_line(200)})",
            "check NCCL (NCCL_DEBUG=INFO), the GPU interconnect and that no other "
            "process holds the GPUs",
        )
    bus = 2 * (gpus - 1) / gpus * size_mib * 2**20 / seconds[0] / 1e9
    return ok(
        "nccl",
        f"all-reduce of {size_mib} MiB bf16 over {gpus} GPUs: "
        f"{1000 * seconds[0]:.2f} ms, bus bandwidth {bus:.0f} GB/s",
    )


# --------------------------------------------------------------------------- the recipe


def synthetic_shards(folder: Path, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    """A shard folder of random GPT-2 token ids in the prepare stage's format (one validation
    and one train shard, manifest included): training runs on it without real data."""
    from pipeline.data.shards import build_manifest, shard_name, write_manifest, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for index, (split, n) in enumerate((("val", val_tokens), ("train", train_tokens))):
        name = shard_name("synthetic", split, index)
        digest = write_shard(folder / name, rng.integers(0, 50257, n, dtype=np.uint16))
        shards.append({"file": name, "split": split, "tokens": n, "sha256": digest})
    settings = {
        "name": "synthetic",
        "source": {"kind": "random tokens", "seed": seed},
        "shard_size": train_tokens,
        "val_tokens": val_tokens,
    }
    write_manifest(folder, build_manifest(settings, shards, {"val": 1, "train": 1}))
    return folder


def check_recipe(experiment: str, gpus: int, price: float, steps: int, work: Path) -> Check:
    """`steps` training steps of the experiment on `gpus` GPUs (the launch script), on random
    tokens; tokens/s and MFU from metrics.jsonl (the steps after the first five), peak memory,
    and the time and cost of the recipe's whole token budget."""
    if not torch.cuda.is_available():
        return skipped("recipe", "no CUDA device")
    cfg = _recipe(experiment)
    tokens_per_step = cfg.trainer.tokens_per_step
    shards = synthetic_shards(
        work / "shards",
        train_tokens=max(tokens_per_step * (steps + 2), 10_000_000),
        val_tokens=1_000_000,
    )
    args = [
        f"experiment={experiment}",
        f"data.shard_dir={shards}",
        f"trainer.runs_dir={work}",
        "trainer.run_name=preflight",
        f"trainer.max_steps={steps}",
        "trainer.log_interval=1",
        "eval.tokens=0",
        "eval.sample_tokens=0",
        "checkpoint.interval=0",
        "checkpoint.resume=never",
        "logger=none",
    ]
    env = {"NPROC": str(gpus), "PYTHON": sys.executable}
    gc.collect()
    torch.cuda.empty_cache()  # what the checks before left cached on GPU 0: the run's memory
    command = ["bash", "launch/train_single_node.sh", *args]
    out = run_timed(command, env=env, timeout_s=RECIPE_TIMEOUT_S)
    if out.timed_out:
        return problem(
            "recipe",
            f"{steps} steps of {experiment} did not finish in {RECIPE_TIMEOUT_S} s",
            "look for a hang with make train and the same "
            "settings (NCCL_DEBUG=INFO), or a very slow first compile",
        )
    if not out.ok:
        return problem(
            "recipe",
            f"{steps} steps of {experiment} on {gpus} GPU(s) failed ({out.why()}: "
            f"{out.last_line()})",
            "lower trainer.micro_batch_size (make max-batch) or read the output of make "
            "train with the same settings",
        )
    wall, train = out.seconds, read_records(work / "preflight", "train")[5:]
    rate = measured_tokens_per_s(work / "preflight", skip_first=5)
    mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
    memory = max((r.get("peak_memory_gib") or 0.0) for r in train)
    total = cfg.max_steps * tokens_per_step
    cost = estimate_cost(total, rate, gpus, price)
    shown_mfu = f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a"
    return ok(
        "recipe",
        f"{experiment} on {gpus} GPU(s): {rate:,.0f} tokens/s, MFU {shown_mfu}, "
        f"peak memory {memory:.1f} GiB per GPU; {total / 1e9:.1f}B tokens take "
        f"{cost['wall_h']:.1f} h, {cost['gpu_hours']:.0f} GPU-hours = {cost['cost']:,.0f} "
        f"at {price}/GPU-hour; {steps} steps in {wall:.0f} s with start-up",
    )


def _recipe(experiment: str):
    from hydra import compose, initialize_config_dir

    from pipeline.config import conf_dir, register_configs, to_dataclass

    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return to_dataclass(compose("train", [f"experiment={experiment}"]))


# --------------------------------------------------------------------------- disk


def check_disk(experiment: str, folders: list[Path], write_mib: int) -> Check:
    """Free space of the shard and run folders against the recipe's shards (2 bytes a token,
    the recipe's whole budget) plus its kept checkpoints (16 bytes a parameter each: fp32
    weights and two AdamW moments, and the rng and state files), and the speed of writing
    write_mib MiB with fsync."""
    cfg = _recipe(experiment)
    with torch.device("meta"):  # sizes only: no tensor is allocated
        model = GPT(cfg.model)
    checkpoints = 16 * model.num_params() * (cfg.checkpoint.keep_last + 2)
    shards = 2 * cfg.max_steps * cfg.trainer.tokens_per_step
    need = shards + checkpoints
    folder = next((f for f in folders if f.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    speed = _write_speed(folder, write_mib)
    detail = (
        f"{folder.resolve()}: {free / 1e9:,.0f} GB free, {experiment} needs ~"
        f"{need / 1e9:,.0f} GB ({shards / 1e9:,.0f} GB of shards, {checkpoints / 1e9:,.1f} "
        f"GB of checkpoints); writes {speed:,.0f} MB/s (fsync)"
    )
    if free < need:
        return problem(
            "disk",
            detail,
            "mount a larger data disk (make setup-gpu "
            "DATA_DISK=/dev/...) or keep fewer checkpoints "
            "(checkpoint.keep_last)",
        )
    return ok("disk", detail)


def _write_speed(folder: Path, mib: int) -> float:
    """MB/s of writing mib MiB to a temporary file in folder, fsynced."""
    chunk = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-") as f:
        start = time.perf_counter()
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        return mib * (1 << 20) / (time.perf_counter() - start) / 1e6


# --------------------------------------------------------------------------- the command


def run_checks(args: argparse.Namespace, work: Path) -> list[Check]:
    gpus = args.gpus or (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    steps: list[Callable[[], Check]] = [
        check_versions,
        check_bf16,
        check_attention,
        check_compile,
        check_step,
        check_optimizers,
        lambda: check_nccl(gpus, work),
        lambda: check_recipe(args.experiment, gpus, args.price, args.steps, work),
        lambda: check_disk(args.experiment, [Path("shards"), Path("runs")], args.write_mib),
    ]
    checks = []
    for step in steps:
        check = step()
        print(f"{check.name}: {check.status}: {check.detail}", flush=True)
        checks.append(check)
    return checks


def render(checks: list[Check]) -> str:
    return table(["check", "result", "figures"], [[c.name, c.status, c.detail] for c in checks])


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m pipeline.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="gpt2_124m_10bt", help="recipe to try and to cost")
    p.add_argument("--gpus", type=int, help="GPUs for the recipe's steps (default: all)")
    p.add_argument("--price", type=float, default=2.5, help="price per GPU-hour, for the cost")
    p.add_argument("--steps", type=int, default=20, help="training steps of the recipe")
    p.add_argument("--write-mib", type=int, default=1024, help="MiB written for the disk speed")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every check, print the table; returns the exit code (0, or 2 with each problem
    printed as one line on stderr)."""
    args = build_parser().parse_args(argv)
    if args.steps < 7 or args.write_mib < 1 or (args.gpus is not None and args.gpus < 1):
        raise ConfigError(
            "--steps must be >= 7 (5 warm-up steps are left out), --write-mib >= 1 and --gpus >= 1"
        )
    check_command_line("train", [f"experiment={args.experiment}"])  # before any check runs
    with tempfile.TemporaryDirectory(prefix="preflight-") as tmp:
        checks = run_checks(args, Path(tmp))
    print()
    print(render(checks))
    ran = [c.name for c in checks if c.status != "skipped"]
    print(
        f"\nran {', '.join(ran)}; skipped "
        f"{', '.join(c.name for c in checks if c.status == 'skipped') or 'none'}"
    )
    problems = [c for c in checks if c.status == "problem"]
    for c in problems:
        print(f"error: {c.name}: {c.detail} — {c.fix}", file=sys.stderr)
    return 2 if problems else 0
