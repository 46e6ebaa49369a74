"""The training loop: `setup(cfg, held)` builds a run from its config, `train(cfg)` steps it,
and `TrainStep` is one optimizer step (the learning rate, gradient accumulation over
micro-batches, clipping, the finite check, the update).

A step reads top to bottom in two files: this one and pipeline.training.reporter (the run's
state, its throughput, and what it reports). The components own their schedules: the
Validator decides when to validate, the Checkpointer when to save; the loop only calls them.
Training runs the step under an accelerate.Accelerator; the planner's memory probe
(pipeline.tools.probe) runs the same step in one process through `SingleProcess`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from torch.distributed.tensor import DTensor

from pipeline.config import TrainConfig, as_dict
from pipeline.data.loader import TrainLoader
from pipeline.data.shards import open_split
from pipeline.errors import ConfigError, NumericsError, raise_if
from pipeline.files import folder_lock, make_folder
from pipeline.model import GPT, liger_available
from pipeline.training import wandb_run
from pipeline.training.checkpoint.manager import Checkpointer
from pipeline.training.faults import StopSignal, inject
from pipeline.training.optim import Optimizers, build_optimizer, continuation_problem, lr_at
from pipeline.training.profiling import PROFILE_DIR, StepProfiler
from pipeline.training.reporter import Reporter, RunState, Throughput, every, main_print, peak_flops
from pipeline.training.runtime import (
    compile_enabled,
    make_accelerator,
    prepare,
    resolve_precision,
    shard,
)
from pipeline.training.validator import Validator


@dataclass
class Run:
    """Everything a training run holds; built by `setup`, stepped by `train`."""

    cfg: TrainConfig
    model: GPT  # unwrapped (sharded in place under FSDP): saving, evaluation, sampling
    step: TrainStep  # one optimizer step of the wrapped (DDP or sharded, compiled) model
    loader: TrainLoader
    state: RunState
    validator: Validator
    checkpointer: Checkpointer
    reporter: Reporter
    profiler: StepProfiler
    throughput: Throughput
    window: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)
    """(loss, grad norm, seconds) of the finite steps since the last train record."""

    def save(self) -> Path | None:
        """Checkpoint the run now (collective); the folder on the main process."""
        return self.checkpointer.save(self.state, self.model, self.step.optimizer, self.loader)

    def log_step(self, result: StepResult, lr: float, dt: float, bad_steps: int) -> None:
        """Log the step just taken, of dt seconds: a train record every log_interval steps and
        at the last, with the loss and gradient norm averaged over the steps since the previous
        record, their tokens/s and MFU; a skip record for every non-finite step, at once, with
        bad_steps the skipped steps in a row. A step that stops the run (a signal) writes its
        record too, so that none of its steps goes unrecorded."""
        self.checkpointer.poll()
        t, step, max_steps = self.cfg.trainer, self.state.step, self.cfg.max_steps
        loss, grad_norm = result.loss, result.grad_norm
        if not result.finite:
            text = (
                f"warning: step {step}: loss {loss}, grad norm {grad_norm}: update skipped "
                f"({bad_steps} in a row, limit {t.max_bad_steps})"
            )
            self.reporter.log("skip", step, {"loss": loss, "grad_norm": grad_norm}, text)
            return
        util = self.throughput.mfu(t.tokens_per_step / dt)
        self.reporter.time_step(t.tokens_per_step, dt, util)
        self.window.append((loss, grad_norm, dt))
        if every(step, t.log_interval, max_steps) or result.stopping:
            n = len(self.window)
            losses, norms, seconds = (sum(column) for column in zip(*self.window))
            self.window.clear()
            rate = n * t.tokens_per_step / seconds
            device = self.step.processes.device
            memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            self.reporter.train_step(
                step=step,
                max_steps=max_steps,
                loss=losses / n,
                lr=lr,
                grad_norm=norms / n,
                tokens_per_step=t.tokens_per_step,
                step_time_s=seconds / n,
                mfu=self.throughput.mfu(rate),
                tokens_seen=self.state.tokens_seen,
                num_processes=self.throughput.devices,
                peak_memory=memory,
            )


def build_model(cfg: TrainConfig, device: torch.device, rank: int = 0) -> GPT:
    """The run's GPT on device, initialised from trainer.seed (the same weights on every
    process), with the runtime's activation checkpointing and loss, sharded in place under
    runtime.fsdp (each block compiled first, per compile_enabled, as torchtitan orders
    them). Afterwards torch draws from trainer.seed + rank: each process its own
    dropout (the data order has a seeded generator of its own, the same on every process)."""
    torch.manual_seed(cfg.trainer.seed)
    model = GPT(cfg.model).to(device)
    torch.manual_seed(cfg.trainer.seed + rank)
    model.activation_checkpointing = cfg.runtime.activation_checkpointing
    model.loss_impl = cfg.runtime.loss_impl
    if cfg.runtime.fsdp:  # before the optimizer, which must hold the sharded parameters
        compiled = compile_enabled(cfg.runtime, device)
        precision = resolve_precision(cfg.runtime.precision, device)
        shard(model, precision, compile_mode=cfg.runtime.compile_mode if compiled else None)
    return model


def setup(cfg: TrainConfig, held: contextlib.ExitStack) -> Run:
    """Check the config and data, lock the run folder (the main process, into `held`, which
    releases it), build model, optimizer and loader, and restore the newest checkpoint when
    resuming. Raises ConfigError, ShardError, CheckpointError, FolderLockedError (another
    process holds the run) or OutputError (the folder cannot be created) before any step."""
    accelerator = make_accelerator(cfg.runtime)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    login = wandb_run.login_problem(cfg.logger) if accelerator.is_main_process else None
    raise_if(cfg.problems(world) + ([login] if login else []))  # before any work
    if cfg.runtime.loss_impl == "liger" and not liger_available(device):
        raise ConfigError(
            "runtime.loss_impl=liger needs a CUDA device and liger-kernel (pip install "
            "liger-kernel): install it, or use runtime.loss_impl=chunked (the default)"
        )
    t, d, vocab, fsdp = cfg.trainer, cfg.data, cfg.model.vocab_size, cfg.runtime.fsdp
    main, run_dir, config = accelerator.is_main_process, Path(t.runs_dir) / t.run_name, as_dict(cfg)
    if main:  # before anything is written: a second process on this run stops here
        held.enter_context(folder_lock(run_dir, *_run_folder_words(t.run_name)))
    train_split = open_split(d.shard_dir, "train", vocab, d.verify_checksums)
    loader = TrainLoader(
        train_split,
        block_size=cfg.block_size,
        micro_batch_size=t.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=t.seed,
        device=device,
        vocab_size=vocab,
    )
    validator = Validator.load(
        cfg.eval,
        d,
        block_size=cfg.block_size,
        vocab_size=vocab,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        max_steps=cfg.max_steps,
        accelerator=accelerator,
        fsdp=fsdp,
    )
    checkpointer = Checkpointer(
        cfg.checkpoint,
        run_dir,
        max_steps=cfg.max_steps,
        last_stable_step=cfg.decay_start if cfg.optim.schedule == "wsd" else None,
        config=config,
        accelerator=accelerator,
        fsdp=fsdp,
        say=main_print(main),
        timeout_s=cfg.runtime.dist_timeout_s,
    )

    model = build_model(cfg, device, rank)
    optimizer = build_optimizer(model, cfg.optim, device.type, world)
    check = functools.partial(continuation_problem, cfg=cfg)
    resume_from, state = checkpointer.restore(model, optimizer, loader, check)
    forward, no_sync = prepare(model, optimizer, accelerator, cfg.runtime)
    grad_accum, clip = cfg.grad_accum_steps(world), cfg.optim.grad_clip
    step = TrainStep(
        model,
        forward,
        optimizer,
        grad_accum=grad_accum,
        grad_clip=clip,
        processes=accelerator,
        no_sync=no_sync,
    )
    reporter = Reporter(
        main,
        run_dir,
        cfg.logger,
        run_name=t.run_name,
        config=config,
        resume_step=state.step + 1 if resume_from else 0,
        wandb_id=state.wandb_id,
    )
    state.wandb_id = reporter.wandb_id
    profiler = StepProfiler(
        cfg.profile.steps,
        cfg.profile.start,
        out_dir=run_dir / PROFILE_DIR,
        device=device,
        enabled=main,
        done=reporter.print,
    )
    flops = model.flops_per_token(cfg.block_size)
    throughput = Throughput(flops, peak_flops(device, cfg.runtime.peak_flops), world)
    compiled = compile_enabled(cfg.runtime, device)
    reporter.print(
        f"run {run_dir} | {model.num_params():,} parameters | {world} process(es) on {device} | "
        f"precision {accelerator.mixed_precision} | "
        f"compile {f'{compiled} ({cfg.runtime.compile_mode})' if compiled else False} | "
        f"{'FSDP full shard' if fsdp else 'data parallel'} | "
        f"grad_accum_steps {grad_accum} | {cfg.max_steps} steps x "
        f"{t.tokens_per_step:,} tokens | train split {train_split.num_tokens:,} tokens"
        + (f" | resuming from {resume_from}" if resume_from else "")
    )
    return Run(
        cfg,
        model,
        step,
        loader,
        state,
        validator=validator,
        checkpointer=checkpointer,
        reporter=reporter,
        profiler=profiler,
        throughput=throughput,
    )


def train(cfg: TrainConfig) -> dict:
    """Train per cfg; returns a summary: steps, tokens_seen, val_loss and best_val_loss
    (nats/token, None without validation), checkpoint path, wall_s, and preempted (stopped by
    SIGTERM/SIGUSR1/SIGUSR2 after writing a checkpoint; run again to continue).

    Raises ConfigError (listing every problem), ShardError or CheckpointError before the first
    step when the config, data or checkpoints cannot run; NumericsError after
    trainer.max_bad_steps non-finite steps in a row (a checkpoint of the last good weights is
    written first).
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, released however train ends
        return _train(setup(cfg, held))


def _train(run: Run) -> dict:
    """Step a run that setup built to its end, or to a stop signal; returns train's summary."""
    cfg = run.cfg
    state, optim, max_steps = run.state, cfg.optim, cfg.max_steps
    if state.step >= max_steps:
        run.reporter.print(f"run already complete: {state.step} of {max_steps} steps done")
    elif state.step == 0 and run.validator.enabled:
        run.validator.run(run.model, state, run.reporter)  # the untrained baseline, ~ln(vocab)
    path, started, bad_steps, stop = None, time.perf_counter(), 0, StopSignal()
    with stop, run.profiler, contextlib.closing(run.reporter), run.checkpointer:
        for step in range(state.step, max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, optim, max_steps)  # AdamW's; Muon's follows at its own peak
            result = run.step(
                step + 1,
                lr / optim.max_lr,
                run.loader.next_batch,
                stop.requested,
                run.loader.prefetch,
            )
            state.advance(cfg.trainer.tokens_per_step)
            bad_steps = 0 if result.finite else bad_steps + 1
            run.log_step(result, lr, time.perf_counter() - t0, bad_steps)
            run.profiler.step()
            if bad_steps >= cfg.trainer.max_bad_steps:
                run.save()
                raise NumericsError(
                    f"{bad_steps} steps in a row had a non-finite loss or gradient norm (last: "
                    f"step {state.step}); the checkpoint holds the last good weights. Lower "
                    "optim.max_lr, raise optim.warmup_steps or check the data, then resume"
                )
            if run.validator.due(state.step):
                run.validator.run(run.model, state, run.reporter)
            if run.checkpointer.due(state.step) or result.stopping:
                path = run.save()
            if result.stopping:
                cause = stop.received or "a signal to another process"
                run.reporter.print(
                    f"stopping after step {state.step} on {cause}: resume to continue"
                )
                break
        run.checkpointer.wait()  # the save in flight is complete before the run reports it
        summary = {
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "val_loss": state.val_loss,
            "best_val_loss": state.best_val_loss,
            "checkpoint": str(path) if path else None,
            "wall_s": time.perf_counter() - started,
            "preempted": state.step < max_steps,
        }
        run.reporter.summary(summary, state.tokens_seen)
    return summary


def for_sweep_job(cfg: TrainConfig) -> TrainConfig:
    """In a Hydra multirun, make job N the run `<run_name>/N` (its own folder, checkpoints and
    resume) and group its W&B run under `<run_name>` unless logger.group is set. Unchanged
    outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    sweep = cfg.trainer.run_name
    cfg.trainer.run_name = f"{sweep}/{HydraConfig.get().job.num}"
    cfg.logger.group = cfg.logger.group or sweep
    return cfg


def _run_folder_words(run_name: str) -> tuple[str, str]:
    """(what, instead) for pipeline.files' folder checks of a run folder."""
    return f"run {run_name}: its folder", "trainer.run_name or trainer.runs_dir"


def check_run_folder(runs_dir: str, run_name: str) -> None:
    """Check the run folder of a single run before Hydra creates it and writes `.hydra/` into
    it: a file where the folder must be, or another live process training the same run,
    raises OutputError or FolderLockedError (exit 2) here instead of a Hydra traceback or a
    rewritten `.hydra/config.yaml` of the live run. Only the main process (RANK 0 or unset)
    probes the lock; setup() takes it for the whole run."""
    run_dir = Path(runs_dir) / run_name
    if os.environ.get("RANK", "0") != "0":
        make_folder(run_dir, *_run_folder_words(run_name))
        return
    with folder_lock(run_dir, *_run_folder_words(run_name)):
        pass


# --------------------------------------------------------------------------- one optimizer step

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
        loss = accumulate_gradients(
            self.forward,
            next_batch,
            self.grad_accum,
            procs,
            self.no_sync,
            poison=inject("nan", step),
        )
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
