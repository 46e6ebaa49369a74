"""The memory benchmark: peak training memory per micro-batch size, and the largest that fits.

GPT-2 124M and 350M on an 80 GB GPU: measured with real training steps on CUDA
(`pipeline.tools.probe.cuda_step_fits`), else the analytic estimate
(`pipeline.tools.memory_estimate.estimate_memory`). Memory in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import PRESETS, ModelConfig
from pipeline.tools.memory_estimate import (
    GIB,
    count_params,
    estimate_memory,
    largest_power_of_two_fitting,
)
from pipeline.tools.probe import cuda_step_fits, find_max_micro_batch
from pipeline.tools.render import table

MEMORY_MODELS = ("gpt2", "gpt2_medium")
"""GPT-2 124M and 350M: peak training memory per micro-batch size."""
MEMORY_CAP_BYTES = 79 * GIB
"""An 80 GB GPU: the 79 GiB that an H100 or A100 80GB leaves to CUDA. On a larger GPU the
caching allocator is limited to this (`torch.cuda.set_per_process_memory_fraction`), so the
largest micro-batch is the one that fits on an 80 GB card."""
MEMORY_MAX_BATCH = 512


@dataclass
class MemoryResult:
    """Peak training memory of one model per micro-batch size (bytes), measured on CUDA or
    estimated (`pipeline.tools.memory_estimate.estimate_memory`) without it, and the largest
    micro-batch within cap_bytes."""

    model: str
    params: int
    block_size: int
    peaks: dict[int, int]
    largest: int
    cap_bytes: int
    measured: bool


def bench_memory(
    block_size: int = 1024,
    models: tuple[str, ...] = MEMORY_MODELS,
    cap_bytes: int = MEMORY_CAP_BYTES,
    compile: bool = False,
) -> list[MemoryResult]:
    """On CUDA: real bf16 training steps (`pipeline.tools.probe.cuda_step_fits`: the real AdamW, two
    steps of two micro-batches) at micro-batch sizes doubling from 1, then bisecting, up to the
    largest that fits within cap_bytes; peak = torch.cuda.max_memory_allocated. Without CUDA:
    the analytic estimate at powers of two up to the largest within cap_bytes."""
    results = []
    for name in models:
        cfg = PRESETS[name]
        if torch.cuda.is_available():
            peaks = _measured_peaks(cfg, block_size, cap_bytes, compile)
            measured, largest = True, max(peaks, default=0)
        else:
            largest = largest_power_of_two_fitting(cfg, block_size, cap_bytes)
            sizes = [2**k for k in range(largest.bit_length())]
            peaks = {b: estimate_memory(cfg, b, block_size)["total"] for b in sizes}
            measured = False
        results.append(
            MemoryResult(name, count_params(cfg), block_size, peaks, largest, cap_bytes, measured)
        )
        print(f"memory {name}: largest micro-batch {largest}", flush=True)
    return results


def _measured_peaks(
    cfg: ModelConfig, block_size: int, cap_bytes: int, compile: bool
) -> dict[int, int]:
    """{micro_batch_size: peak bytes} of every size tried that fit under the cap."""
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    peaks: dict[int, int] = {}
    try:
        find_max_micro_batch(
            lambda b: cuda_step_fits(cfg, b, block_size, "bf16", compile, device, peaks),
            high=MEMORY_MAX_BATCH,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return dict(sorted(peaks.items()))


def render_memory(results: list[MemoryResult]) -> str:
    """The memory section: peak GiB per micro-batch size for each model, and the largest
    micro-batch within the cap."""
    r0 = results[0]
    sizes = sorted({b for r in results for b in r.peaks})
    rows = [
        [str(b)] + [f"{r.peaks[b] / GIB:,.2f}" if b in r.peaks else "—" for r in results]
        for b in sizes
    ]
    header = ["micro_batch_size"] + [f"{r.model} ({r.params / 1e6:,.0f}M) GiB" for r in results]
    cap = f"{r0.cap_bytes / GIB:,.0f} GiB (an 80 GB GPU)"
    if r0.measured:
        how = (
            "Measured: `pipeline.tools.probe.cuda_step_fits`, the real model and fused AdamW, bf16 "
            "autocast, torch.compile off, two optimizer steps of two micro-batches of block "
            f"{r0.block_size}; peak = `torch.cuda.max_memory_allocated` (the CUDA context, "
            "~0.5 GiB, comes on top). Sizes double from 1 until one does not fit, then "
            f"bisect; the caching allocator is limited to {cap}. "
            "— : not tried."
        )
    else:
        how = (
            "No CUDA device: these are the analytic estimates of `make memory` "
            "(`pipeline.tools.memory_estimate.estimate_memory`, eager bf16, block "
            f"{r0.block_size}), not measurements, at powers of two within {cap}. Run `make "
            "bench` on a GPU for measured figures. — : beyond the cap."
        )
    largest = ", ".join(f"{r.model} {r.largest}" for r in results)
    return "\n".join(
        [
            "### memory: peak training memory per micro-batch",
            "",
            how,
            "",
            table(header, rows),
            "",
            f"Largest micro_batch_size within {cap}: {largest}.",
        ]
    )
