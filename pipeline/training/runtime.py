"""Where and how the steps run, for training, evaluation and sampling alike: the device, the
precision (one resolver, so `precision=auto` means the same everywhere), the autocast context,
and the process-level memory setting for CPUs; for training, the Accelerator, FSDP sharding and
compilation."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pipeline.config import RuntimeConfig
from pipeline.model import GPT
from pipeline.training.optim import Optimizers, is_sharded

if TYPE_CHECKING:  # evaluation and sampling import this module without needing accelerate
    from accelerate import Accelerator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc <malloc.h>


def keep_freed_memory_on_cpu(threshold_bytes: int = 1 << 30) -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    A CPU training step allocates and frees tensors of hundreds of MB (the (B, T, 50304)
    logits and their gradients). By default glibc serves such blocks with mmap and gives them
    back with munmap, so every step faults the same memory in again page by page: on a 2-core
    machine that doubled the tiny model's step time. Raising the mmap and trim thresholds makes
    freed blocks reusable. Returns False where the C library has no mallopt (not glibc);
    CUDA memory is unaffected (PyTorch's caching allocator already reuses it).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes)) and bool(
        mallopt(M_TRIM_THRESHOLD, threshold_bytes)
    )


def resolve_device(cpu: bool = False) -> torch.device:
    """The device to run on: the current CUDA device when there is one and cpu is False (with
    TF32 matmuls, use_tf32), else the CPU (with freed memory kept, keep_freed_memory_on_cpu).
    The current CUDA device is the process's own once accelerate has set it (LOCAL_RANK)."""
    if cpu or not torch.cuda.is_available():
        keep_freed_memory_on_cpu()
        return torch.device("cpu")
    use_tf32()
    return torch.device("cuda", torch.cuda.current_device())


def use_tf32() -> None:
    """float32 matmuls (an fp32 run, or what autocast leaves in float32) on TF32 tensor cores
    (Ampere and newer): about 8× the float32 rate for a 10-bit mantissa in the products, as
    nanoGPT and torchtitan run them."""
    torch.set_float32_matmul_precision("high")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`bf16` or `fp32` for a `precision` setting of auto, bf16 or fp32 on `device`: auto is
    bf16 on a CUDA device that supports it (Ampere or newer) and fp32 elsewhere (bf16
    autocast is slow on most CPUs)."""
    if precision == "auto":
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if supported else "fp32"
    return precision


def autocast_for(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for a resolved precision (bf16: torch.autocast to
    bfloat16, float32 master weights; fp32: no autocast)."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_accelerator(cfg: RuntimeConfig) -> Accelerator:
    """One Accelerator owns devices, processes and mixed precision; precision as
    resolve_precision decides for the device resolve_device picks; collectives time out after
    runtime.dist_timeout_s."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    device = resolve_device(cfg.cpu)  # before accelerate sets the process's own GPU: its type
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if bf16 else "no",
        kwargs_handlers=[timeout],
    )


def shard(model: GPT, precision: str, compile_mode: str | None = None) -> None:
    """FSDP2 full shard as torchtitan applies it: parameters, gradients and optimizer states
    split over the processes. Per block, in torchtitan's order: activation checkpointing (the
    block's own, GPT.activation_checkpointing, set before), torch.compile of the block
    (compile_mode; None: eager), then `fully_shard(block)`, so each block is one unit gathered
    only for its own forward and backward; then the root unit, which holds the embeddings
    (tied with the output layer) and the final LayerNorm, and stays eager.

    precision "bf16": MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), as
    torchtitan's default: each unit is all-gathered in bf16 (half the bytes of fp32) and
    computes in bf16 without autocast; gradients are reduce-scattered in float32 into the
    float32 shards, which the optimizer updates. "fp32": everything in float32."""
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile_mode is not None:
            block.compile(mode=compile_mode, fullgraph=True)  # in place: same parameter names
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def compile_enabled(cfg: RuntimeConfig, device: torch.device) -> bool:
    """runtime.compile, or when it is null, whether device is a CUDA device."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def prepare(
    model: GPT, optimizer: Optimizers, accelerator: Accelerator, cfg: RuntimeConfig
) -> tuple[Callable, Callable[[], contextlib.AbstractContextManager]]:
    """Wrap a built (and, under runtime.fsdp, sharded) model and its optimizers for training.
    Returns the training forward(x, y) and its no_sync() context (gradient reduction off for
    the micro-steps before the last). Replaces optimizer.optimizers with the prepared ones (not
    a ZeroRedundancyOptimizer, which needs no wrapper).

    Data parallel: DDP through accelerator.prepare with several processes, under the
    accelerator's autocast, the whole model compiled per compile_enabled. FSDP: the model as
    shard() left it (compiled per block, bf16 by its MixedPrecisionPolicy, no autocast), and
    no no_sync: gradients are reduce-scattered at every micro-step, so no process holds
    unsharded gradients across a gradient accumulation (torchtitan's default; the sharded
    float32 gradients accumulate)."""
    if cfg.fsdp:
        optimizer.optimizers = [accelerator.prepare(opt) for opt in optimizer]
        return model, contextlib.nullcontext
    # DDP with several processes; a ZeroRedundancyOptimizer stays as it is (accelerate's
    # wrapper would read its state_dict, which exists only once consolidated)
    plain = [opt for opt in optimizer if not is_sharded(opt)]
    ddp_model, *prepared = accelerator.prepare(model, *plain)
    wrapped = iter(prepared)
    optimizer.optimizers = [opt if is_sharded(opt) else next(wrapped) for opt in optimizer]
    compile_model = compile_enabled(cfg, accelerator.device)
    forward = torch.compile(ddp_model, mode=cfg.compile_mode) if compile_model else ddp_model
    return forward, functools.partial(accelerator.no_sync, ddp_model)
