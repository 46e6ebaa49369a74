"""The largest micro-batch that trains, found by trying real training steps on a CUDA device.

`find_max_micro_batch` searches sizes with any fits/does-not-fit test; `cuda_step_fits` is the
test on a GPU: it runs `training_steps` and catches CUDA out-of-memory. Memory in bytes.
Nothing runs at import time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from pipeline.config import OptimConfig
from pipeline.errors import ConfigError
from pipeline.model import GPT, ModelConfig
from pipeline.tools.memory import PRECISION_BYTES
from pipeline.training.optim import build_optimizer
from pipeline.training.runtime import autocast_for, with_autocast
from pipeline.training.step import SingleProcess, StepResult, TrainStep


def find_max_micro_batch(try_step: Callable[[int], bool], low: int = 1, high: int = 1024) -> int:
    """The largest micro-batch size b in [low, high] with try_step(b) True, or 0 if try_step(low)
    is False. Assumes monotonicity (if b fits, every smaller size fits): doubles from low until a
    size fails or high is reached, then bisects between the last size that fit and the first
    that failed: at most 2·ceil(log2(high)) + 1 calls. Raises ConfigError (a ValueError)
    unless 1 <= low <= high."""
    if not 1 <= low <= high:
        raise ConfigError(f"need 1 <= low <= high, got low={low}, high={high}")
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
    to torch.cuda.max_memory_allocated in bytes. Raises ValueError for a non-CUDA device,
    ConfigError (a ValueError) for an unknown precision.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"cuda_step_fits needs a CUDA device, got {device} (CUDA available: "
            f"{torch.cuda.is_available()}); use estimate_memory without a GPU"
        )
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision={precision!r}: use one of {sorted(PRECISION_BYTES)}")
    _release_cuda_memory(compile)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        training_steps(model_cfg, micro_batch_size, block_size, precision, compile, device,
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


def training_steps(
    model_cfg: ModelConfig,
    micro_batch_size: int,
    block_size: int,
    precision: str,
    compile: bool,
    device: torch.device,
    steps: int = 2,
    grad_accum: int = 2,
    optimizer: str = "adamw",
) -> StepResult:
    """`steps` optimizer steps of `grad_accum` micro-batches of random tokens, run by the
    training loop's own step (pipeline.training.step.TrainStep in one process: the chunked
    loss, the model's default; gradient clipping; the real optimizer at its peak rate; bf16
    autocast when precision is "bf16"). Returns the last step's StepResult."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    optim_cfg = OptimConfig(name=optimizer)
    forward = with_autocast(torch.compile(model) if compile else model,
                            autocast_for(precision, device))  # fmt: skip
    step = TrainStep(model, forward, build_optimizer(model, optim_cfg, device.type), grad_accum,
                     optim_cfg.grad_clip, SingleProcess(device))  # fmt: skip

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch_size, block_size + 1),
                               device=device)  # fmt: skip
        return tokens[:, :-1], tokens[:, 1:]

    for i in range(steps):
        result = step(i + 1, 1.0, next_batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result
