"""The largest micro-batch that trains, found by trying real training steps on a CUDA device.

`find_max_micro_batch` searches sizes with any fits/does-not-fit test. `RunProbe` is the test
for a run's config (`make max-batch EXPERIMENT=...`): the model, optimizer, wrappers and
compilation built once, as pipeline.training builds them, then tried at each size.
`cuda_step_fits` tests a bare model preset (the memory benchmark). Memory in bytes. Nothing runs
at import time.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import OptimConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.model import GPT, ModelConfig
from pipeline.tools.memory_estimate import PRECISION_BYTES
from pipeline.training.loop import SingleProcess, StepResult, TrainStep, build_model
from pipeline.training.optim import build_optimizer
from pipeline.training.runtime import (
    autocast_for,
    compile_enabled,
    resolve_device,
    resolve_precision,
)


def _with_autocast(
    module: Callable, autocast: Callable[[], contextlib.AbstractContextManager]
) -> Callable:
    """module(x, y) under autocast() (e.g. an accelerator's, or autocast_for's), for a model
    that accelerator.prepare did not wrap."""

    def forward(x: torch.Tensor, y: torch.Tensor):
        with autocast():
            return module(x, y)

    return forward


def find_max_micro_batch(
    try_step: Callable[[int], bool], low: int = 1, high: int = 1024, start: int | None = None
) -> int:
    """The largest micro-batch size b in [low, high] with try_step(b) True, or 0 if no size fits.
    Assumes monotonicity (if b fits, every smaller size fits). From `start` (default low; e.g.
    the analytic estimate, to try few sizes): halves until a size fits, doubles until one
    fails or high is reached, then bisects between the last size that fit and the first that
    failed: at most 2·ceil(log2(high)) + 1 calls from low, and a few from a start near the
    answer. Raises ConfigError (a ValueError) unless 1 <= low <= high."""
    if not 1 <= low <= high:
        raise ConfigError(f"need 1 <= low <= high, got low={low}, high={high}")
    fits, fails = min(max(start or low, low), high), None
    while not try_step(fits):
        if fits == low:
            return 0
        fits, fails = max(low, fits // 2), fits
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
    _release_memory(compile)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        training_steps(
            model_cfg, micro_batch_size, block_size, precision, compile, device, optimizer=optimizer
        )
        fits = True
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
        if not _is_out_of_memory(error):
            raise
        fits = False
    if fits and peaks is not None:
        peaks[micro_batch_size] = torch.cuda.max_memory_allocated(device)
    _release_memory(compile)
    return fits


def _release_memory(compiled: bool, cuda: bool = True) -> None:
    """Free an attempt's tensors (their frames are gone once the exception is) and compiled
    graphs, so the next attempt starts from an empty device and compiles for its own static
    shapes (the on-disk compile caches stay)."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if cuda:
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
    training loop's own step (pipeline.training.loop.TrainStep in one process: the chunked
    loss, the model's default; gradient clipping; the real optimizer at its peak rate; bf16
    autocast when precision is "bf16"). Returns the last step's StepResult."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    optim_cfg = OptimConfig(name=optimizer)
    forward = _with_autocast(
        torch.compile(model) if compile else model, autocast_for(precision, device)
    )
    step = TrainStep(
        model,
        forward,
        build_optimizer(model, optim_cfg, device.type),
        grad_accum,
        optim_cfg.grad_clip,
        SingleProcess(device),
    )

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(
            0, model_cfg.vocab_size, (micro_batch_size, block_size + 1), device=device
        )
        return tokens[:, :-1], tokens[:, 1:]

    for i in range(steps):
        result = step(i + 1, 1.0, next_batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


@dataclass
class RunProbe:
    """A run's training step, built once from its TrainConfig as pipeline.training builds it
    (build_model: activation checkpointing, the loss, FSDP; build_optimizer; DDP's gradient
    buckets when the run is data parallel; torch.compile with runtime.compile_mode; autocast
    per runtime.precision), then tried at several micro-batch sizes (fits).

    One process: under FSDP its one shard holds every parameter, gradient and optimizer state,
    which N GPUs split N ways, so a size that fits here fits there. Each size is compiled for
    its own static shapes, as the run compiles them; torch.compile's on-disk caches (Inductor's
    FX graph and AOTAutograd caches) stay warm across sizes and for the run itself."""

    cfg: TrainConfig
    model: GPT
    """The model (sharded in place under FSDP)."""
    data_parallel: bool
    device: torch.device
    compiled: bool
    wrapped: torch.nn.Module | None = None
    """What the step's forward calls: the model, or DDP around it, before torch.compile."""
    step: TrainStep | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, data_parallel: bool) -> RunProbe:
        """The probe of cfg on the current CUDA device (the CPU under runtime.cpu or without
        CUDA: for tests, nothing runs out of memory there). data_parallel: wrap the model in
        DistributedDataParallel (its gradient buckets), as a run on several GPUs without FSDP
        is. Starts a one-process group when none exists (FSDP and DDP need one)."""
        device = resolve_device(cfg.runtime.cpu)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
            )
        model = build_model(cfg, device)
        probe = cls(
            cfg,
            model,
            data_parallel and not cfg.runtime.fsdp,
            device,
            compile_enabled(cfg.runtime, device),
        )
        probe._wrap(build_optimizer(model, cfg.optim, device.type))
        return probe

    def _wrap(self, optimizer) -> None:
        """The step around the model: DDP (a new one: after running out of memory in a
        backward, the old one's gradient reduction is left half done), compile, autocast;
        under FSDP the sharded model as it is."""
        cfg, model, device = self.cfg, self.model, self.device
        wrapped, no_sync, forward = model, contextlib.nullcontext, model
        if not cfg.runtime.fsdp:  # FSDP: compiled per block and bf16 by build_model's shard()
            if self.data_parallel:
                wrapped = DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
                no_sync = wrapped.no_sync
            if self.compiled:
                forward = torch.compile(wrapped, mode=cfg.runtime.compile_mode)
            precision = resolve_precision(cfg.runtime.precision, device)
            forward = _with_autocast(
                forward if self.compiled else wrapped, autocast_for(precision, device)
            )
        self.wrapped = wrapped
        self.step = TrainStep(
            model, forward, optimizer, 2, cfg.optim.grad_clip, SingleProcess(device), no_sync
        )

    def fits(
        self, micro_batch_size: int, peaks: dict[int, int] | None = None, steps: int = 2
    ) -> bool:
        """Whether `steps` optimizer steps of two micro-batches of micro_batch_size random
        sequences (gradient accumulation, as a run with grad_accum_steps > 1 does) fit in the
        device's memory. Returns False on CUDA out-of-memory, after freeing what the attempt
        allocated; on success, peaks[micro_batch_size] (when given) is the peak memory
        allocated, in bytes (CUDA only)."""
        cuda = self.device.type == "cuda"
        _release_memory(self.compiled, cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        block, vocab = self.cfg.block_size, self.cfg.model.vocab_size

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            tokens = torch.randint(0, vocab, (micro_batch_size, block + 1), device=self.device)
            return tokens[:, :-1], tokens[:, 1:]

        optimizer = self.step.optimizer
        try:
            for i in range(steps):
                self.step(i + 1, 1.0, next_batch)
            fits = True
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
            if not _is_out_of_memory(error):
                raise
            fits = False
        self.step.optimizer.zero_grad(set_to_none=True)
        if not fits:
            self.wrapped = self.step = None  # free the old wrapper before building its successor
            _release_memory(self.compiled, cuda)
            self._wrap(optimizer)
        if fits and cuda and peaks is not None:
            peaks[micro_batch_size] = torch.cuda.max_memory_allocated(self.device)
        _release_memory(self.compiled, cuda)
        return fits
