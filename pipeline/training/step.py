"""One optimizer step: the learning rate, gradient accumulation over micro-batches, clipping,
the finite check, the update. Training runs it under an accelerate.Accelerator; the planner's
memory probe (pipeline.tools.probe) runs the same step in one process through `SingleProcess`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor

from pipeline.training.faults import inject
from pipeline.training.optim import Optimizers

Batch = tuple[torch.Tensor, torch.Tensor]
"""Inputs and targets of one micro-batch: (B, T) int64 token ids each, on the device."""


class Processes(Protocol):
    """What a step needs of the processes it runs on; an accelerate.Accelerator is one."""

    device: torch.device
    num_processes: int

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float): ...

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor: ...


@dataclass
class SingleProcess:
    """One process on `device`, without accelerate: plain backward and clipping, no reduction."""

    device: torch.device
    num_processes: int = 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor


def accumulate_gradients(
    forward: Callable,
    next_batch: Callable[[], Batch],
    grad_accum: int,
    processes: Processes,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    poison: bool = False,
) -> torch.Tensor:
    """Forward and backward grad_accum micro-batches, leaving in .grad the gradient of the mean
    loss over all of them (the gradient of one batch grad_accum times larger). Returns that
    mean loss, detached (scalar, on the device). forward(x, y) returns (logits, loss);
    no_sync() suspends the gradient reduction across processes for all but the last
    micro-step; poison makes the loss NaN (fault injection)."""
    loss_sum = torch.zeros((), device=processes.device)
    for micro in range(grad_accum):
        x, y = next_batch()
        last = micro == grad_accum - 1
        with contextlib.nullcontext() if last else no_sync():
            _, loss = forward(x, y)
            if poison:
                loss = loss * float("nan")
            processes.backward(loss / grad_accum)
        loss_sum += loss.detach()
    return loss_sum / grad_accum


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    """Mean training loss over the step's micro-batches and processes (nats/token)."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    finite: bool
    """Both are finite; when False the update was skipped (the weights are unchanged)."""
    stopping: bool
    """Some process received a stop signal (see pipeline.training.faults.StopSignal)."""


@dataclass
class TrainStep:
    """The optimizer step of a run: calling it runs one step and returns its StepResult."""

    model: torch.nn.Module
    """The unwrapped model: its parameters are clipped."""
    forward: Callable
    """The training forward(x, y) -> (logits, loss): wrapped (DDP, FSDP, compiled) or not."""
    optimizer: Optimizers
    grad_accum: int
    """Micro-batches per step on each process."""
    grad_clip: float
    """Max global gradient norm; 0 = no clipping."""
    processes: Processes
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Gradient reduction off, for the micro-steps before the last."""

    def __call__(
        self,
        step: int,
        lr_scale: float,
        next_batch: Callable[[], Batch],
        stop_requested: Callable[[], bool] = lambda: False,
        prefetch: Callable[[], None] = lambda: None,
    ) -> StepResult:
        """Run optimizer step number `step` (1-based, for fault injection) at lr_scale times
        each optimizer's peak rate. One collective reduces the loss together with
        stop_requested() (read after the backward), so every process agrees to stop. A
        non-finite loss or gradient norm skips the update; the gradients are cleared either
        way.

        The host waits for the device once per step: loss, stop flag and gradient norm come
        back in one transfer, after `prefetch()` has read the next step's first micro-batch
        and queued its copy, so the device is not left idle while the host fetches it. (The
        update needs that answer: skipping a non-finite step is decided on the host.)"""
        procs = self.processes
        self.optimizer.set_lr_scale(lr_scale)
        loss = accumulate_gradients(self.forward, next_batch, self.grad_accum, procs,
                                    self.no_sync, poison=inject("nan", step))  # fmt: skip
        grad_norm = procs.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm of all shards together
            grad_norm = grad_norm.full_tensor()
        inject("backward", step)
        # a fill kernel with the flag as its argument: no copy from the host, no wait
        stop = torch.full((), float(stop_requested()), device=procs.device)
        summed = procs.reduce(torch.stack([loss, stop]), "sum")
        prefetch()
        report = torch.stack([summed[0], summed[1], torch.as_tensor(grad_norm).to(summed)])
        loss, stopping, grad_norm = report.tolist()  # the step's one wait for the device
        loss /= procs.num_processes
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:  # a non-finite step is skipped: the weights stay at the last good state
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        inject("optimizer", step)
        return StepResult(loss, grad_norm, finite, bool(stopping))
