"""Where and how the steps run, for training, evaluation and sampling alike: the device, the
precision (one resolver, so `precision=auto` means the same everywhere), the autocast context,
and the process-level memory setting for CPUs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

import torch

from pipeline.model import GPT

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
    """The device to run on: the current CUDA device when there is one and cpu is False, else
    the CPU."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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


def unwrap_model(model: torch.nn.Module) -> GPT:
    """The GPT inside a torch.compile (`_orig_mod`) and/or DDP (`module`) wrapper; the model
    itself when it is not wrapped. Raises TypeError for anything that is not a GPT inside."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a pipeline.model.GPT, got {type(model).__name__}")
        model = inner
    return model
