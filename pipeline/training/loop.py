"""Training stage: `python -m pipeline.train` (one process) or
`accelerate launch -m pipeline.train` (several). `train(cfg)` is the importable entry point."""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from pipeline.config import RuntimeConfig, TrainConfig, as_dict
from pipeline.data.loader import TrainLoader, ValidationWindows
from pipeline.data.shards import open_split
from pipeline.data.tokenizer import get_encoding
from pipeline.errors import (
    CheckpointError,
    ConfigError,
    NumericsError,
    raise_if,
)
from pipeline.evaluation.hellaswag import evaluate_hellaswag, load_items, resolve_path
from pipeline.evaluation.scoring import estimate_loss, generate_text
from pipeline.model import GPT, liger_available
from pipeline.training.checkpoint import (
    full_state,
    list_checkpoints,
    load_checkpoint,
    load_newest_good,
    read_state,
    remove_unfinished,
    resolve_checkpoint,
    save_checkpoint,
)
from pipeline.training.faults import inject
from pipeline.training.optim import Optimizers, build_optimizer, continuation_problem, lr_at
from pipeline.training.profiling import PROFILE_DIR, StepProfiler
from pipeline.training.reporter import Reporter, mfu, peak_flops
from pipeline.training.runtime import keep_freed_memory_on_cpu, resolve_precision

SAMPLE_PROMPT = "The meaning of life is"
CONFIG_EXIT_CODE = 2  # config, data or checkpoint problem: restarting will not help
NUMERICS_EXIT_CODE = 3  # loss or gradients stayed non-finite: restarting will not help
PREEMPTED_EXIT_CODE = (
    75  # stopped by a signal after a checkpoint: restart to continue (EX_TEMPFAIL)
)


def make_accelerator(cfg: RuntimeConfig) -> Accelerator:
    """One Accelerator owns devices, processes and mixed precision; precision as
    pipeline.training.runtime.resolve_precision decides for this process's device."""
    cpu = cfg.cpu or not torch.cuda.is_available()
    if cpu:
        keep_freed_memory_on_cpu()
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")


def restore(
    cfg: TrainConfig, run_dir: Path, model: GPT, optimizer: Optimizers, warn: Callable
) -> tuple[Path | None, dict | None]:
    """Load the checkpoint a run continues from into model and optimizer (and the RNG states);
    returns (folder, state.json) or (None, None) for a new run.

    checkpoint.resume: auto -> the newest checkpoint that loads and can continue cfg (a truncated
    or corrupt one is reported and skipped; so is, when a WSD run is given a larger budget, one
    taken in its decay: see pipeline.optim.continuation_problem), a new run if there is none;
    latest -> the same, but one must exist; never -> a new run, refusing a run folder with
    checkpoints; else a checkpoint folder path. Raises CheckpointError, or ConfigError when the
    checkpoints cannot continue cfg (another optimizer, schedule, or a cosine run's budget).
    """
    resume, check = cfg.checkpoint.resume, functools.partial(continuation_problem, cfg=cfg)
    if resume == "never":
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already has checkpoints and checkpoint.resume=never: use "
                "checkpoint.resume=auto to continue it, or another trainer.run_name"
            )
        return None, None
    if resume in ("auto", "latest"):
        loaded = load_newest_good(run_dir, model, optimizer.raw, warn, check)
        if loaded is None and resume == "latest":
            raise CheckpointError(
                f"checkpoint.resume=latest but {run_dir} has no complete checkpoint: check "
                "trainer.run_name and trainer.runs_dir, or start it with checkpoint.resume=auto"
            )
        return loaded or (None, None)
    path = resolve_checkpoint(resume)
    reason = check(read_state(path))
    if reason is not None:
        raise ConfigError([f"checkpoint.resume={resume}: {reason}"])
    return path, load_checkpoint(path, model, optimizer.raw)


class StopSignal:
    """Notes SIGTERM or SIGUSR1, which cloud providers and SLURM send before killing a job, so
    the loop can finish its step, write a checkpoint and exit with PREEMPTED_EXIT_CODE.
    A context manager: the previous handlers come back on exit (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name


def accumulate_gradients(
    forward: Callable,
    loader: TrainLoader,
    grad_accum: int,
    accelerator: Accelerator,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    poison: bool = False,
) -> torch.Tensor:
    """Forward and backward grad_accum micro-batches, leaving in .grad the gradient of the mean
    loss over all of them (the gradient of one batch grad_accum times larger). Returns that
    mean loss, detached (scalar, on the device). no_sync() suspends the gradient reduction
    across processes for all but the last micro-step; poison makes the loss NaN (fault
    injection)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(grad_accum):
        x, y = loader.next_batch()
        last = micro == grad_accum - 1
        with contextlib.nullcontext() if last else no_sync():
            _, loss = forward(x, y)
            if poison:
                loss = loss * float("nan")
            accelerator.backward(loss / grad_accum)
        loss_sum += loss.detach()
    return loss_sum / grad_accum


def shard(model: GPT) -> None:
    """FSDP2 full shard: parameters, gradients and optimizer states split over the processes.
    Each block is one unit, gathered only for its own forward and backward; the root unit holds
    the embeddings (tied with the output layer) and the final LayerNorm."""
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


@contextlib.contextmanager
def fsdp_no_sync(model: torch.nn.Module):
    """Accumulate gradients locally, without the reduce-scatter (FSDP2's no_sync)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def with_autocast(module: Callable, accelerator: Accelerator) -> Callable:
    """module(x, y) under the accelerator's autocast (bf16 or none), for a model that
    accelerator.prepare did not wrap."""

    def forward(x: torch.Tensor, y: torch.Tensor):
        with accelerator.autocast():
            return module(x, y)

    return forward


def should(step: int, interval: int, last: int) -> bool:
    """True at multiples of interval (0 = never) and at the last step."""
    return step == last or (interval > 0 and step % interval == 0)


@dataclass
class Run:
    """Everything a training run holds; built by `setup`, stepped by `train`."""

    cfg: TrainConfig
    accelerator: Accelerator
    run_dir: Path
    model: GPT  # unwrapped (sharded in place under FSDP): saving, evaluation, sampling
    forward: Callable  # the training forward: DDP-wrapped or sharded, compiled or not
    no_sync: Callable[[], contextlib.AbstractContextManager]  # gradient sync off (accumulation)
    optimizer: Optimizers  # AdamW, or Muon + AdamW
    loader: TrainLoader
    val_windows: ValidationWindows | None
    hellaswag: list  # HellaSwag items scored at each evaluation ([] = none)
    reporter: Reporter
    state: dict  # step, tokens_seen, val_loss, best_val_loss, wandb_id

    def validate(self) -> float:
        """Validation loss on the fixed windows (sharded over ranks, reduced); logs it and,
        on the main process, a sample from the fixed prompt."""
        acc, t, step = self.accelerator, self.cfg.trainer, self.state["step"]
        loss, _ = estimate_loss(
            self.model,
            self.val_windows,
            t.micro_batch_size,
            acc.device,
            acc.process_index,
            acc.num_processes,
            autocast=acc.autocast,
            reduce=lambda x: acc.reduce(x, "sum"),
        )
        best = self.state["best_val_loss"]
        self.state.update(val_loss=loss, best_val_loss=loss if best is None else min(best, loss))
        self.reporter.val_step(step, self.cfg.max_steps, loss, self.state["tokens_seen"])
        if self.hellaswag:
            result = evaluate_hellaswag(
                self.model, self.hellaswag, acc.device, t.micro_batch_size, acc.autocast,
                acc.process_index, acc.num_processes, reduce=lambda x: acc.reduce(x, "sum"),
            )  # fmt: skip
            text = (f"step {step} | HellaSwag acc {result['acc']:.4f} | acc_norm "
                    f"{result['acc_norm']:.4f} | {result['n']} items")  # fmt: skip
            seen = self.state["tokens_seen"]
            self.reporter.log("hellaswag", step, {**result, "tokens_seen": seen}, text)
        if self.cfg.eval.sample_tokens and (
            acc.is_main_process or self.cfg.runtime.fsdp
        ):  # FSDP: every rank runs it
            enc = get_encoding()
            text = generate_text(
                self.model, enc, SAMPLE_PROMPT, self.cfg.eval.sample_tokens, acc.device, t.seed
            )
            self.reporter.sample(step, self.state["tokens_seen"], SAMPLE_PROMPT, text)
        return loss

    def log_step(
        self, loss: float, lr: float, grad_norm: float, dt: float, finite: bool, bad_steps: int
    ) -> None:
        """Log the step just taken (every log_interval, the last, and every skipped one)."""
        t, step, max_steps = self.cfg.trainer, self.state["step"], self.cfg.max_steps
        if not finite:
            text = (
                f"warning: step {step}: loss {loss}, grad norm {grad_norm}: update skipped "
                f"({bad_steps} in a row, limit {t.max_bad_steps})"
            )
            self.reporter.log("skip", step, {"loss": loss, "grad_norm": grad_norm}, text)
            return
        acc = self.accelerator
        peak = peak_flops(acc.device, self.cfg.runtime.peak_flops)
        flops = self.model.flops_per_token(self.cfg.block_size)
        util = mfu(flops, t.tokens_per_step / dt, peak, acc.num_processes)
        self.reporter.time_step(t.tokens_per_step, dt, util)
        if should(step, t.log_interval, max_steps):
            seen, procs = self.state["tokens_seen"], acc.num_processes
            self.reporter.train_step(step, max_steps, loss, lr, grad_norm, t.tokens_per_step, dt,
                                     util, seen, procs)  # fmt: skip

    def checkpoint_due(self, step: int) -> bool:
        """Whether to checkpoint after `step` steps: every checkpoint_interval, at the end and,
        for a WSD run, at its last stable step, from which the run can later be extended."""
        cfg = self.cfg
        last_stable = cfg.optim.schedule == "wsd" and step == cfg.decay_start
        return should(step, cfg.checkpoint.interval, cfg.max_steps) or last_stable

    def replicas_agree(self) -> bool | None:
        """Whether every process holds the same weights, as data parallelism promises: per
        tensor float64 sums, gathered from all ranks and compared exactly (collective). None
        under FSDP, where each process holds a different shard by design."""
        if self.cfg.runtime.fsdp:
            return None
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
        gathered = self.accelerator.gather(sums).view(self.accelerator.num_processes, -1)
        return bool((gathered == gathered[0]).all())

    def save(self) -> Path | None:
        """Checkpoint the run (main process writes; every rank waits). Returns its folder."""
        path, acc = None, self.accelerator
        agree = self.replicas_agree()
        if agree is False:
            self.reporter.print("warning: model weights differ between processes")
        if acc.is_main_process or self.cfg.runtime.fsdp:  # gathering shards is collective
            model_state, optimizer_state = full_state(self.model, self.optimizer.raw)
        if acc.is_main_process:
            step, wsd = self.state["step"], self.cfg.optim.schedule == "wsd"
            extra = {
                "loader": self.loader.state_dict(),
                "config": as_dict(self.cfg),
                "max_steps": self.cfg.max_steps,
                "extendable": wsd and step <= self.cfg.decay_start,  # taken before the decay
                "world_size": self.accelerator.num_processes,
                "replicas_agree": agree,
            }
            self.state["wandb_id"] = self.reporter.wandb_id
            path = save_checkpoint(
                self.run_dir,
                self.state["step"],
                model_state,
                optimizer_state,
                {**self.state, **extra},
                self.cfg.checkpoint.keep_last,
            )
            self.reporter.print(f"saved checkpoint {path}")
        self.accelerator.wait_for_everyone()
        return path


def setup(cfg: TrainConfig) -> Run:
    """Check the config and data, build model, optimizer and loader, and restore the newest
    checkpoint when resuming. Raises ConfigError, ShardError or CheckpointError before any
    training step."""
    accelerator = make_accelerator(cfg.runtime)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    raise_if(cfg.problems(world))
    if cfg.runtime.loss_impl == "liger" and not liger_available(device):
        raise ConfigError([
            "runtime.loss_impl=liger needs a CUDA device and liger-kernel (pip install "
            "liger-kernel): install it, or use runtime.loss_impl=chunked (the default)"
        ])  # fmt: skip
    t = cfg.trainer
    d, vocab = cfg.data, cfg.model.vocab_size
    train_split = open_split(d.shard_dir, "train", vocab, d.verify_checksums)
    loader = TrainLoader(
        train_split, cfg.block_size, t.micro_batch_size, rank, world, t.seed, device, vocab
    )
    val_windows = None
    if cfg.eval.tokens > 0:
        val_split = open_split(d.shard_dir, "val", vocab, d.verify_checksums)
        val_windows = ValidationWindows(val_split, cfg.block_size, cfg.eval.tokens)
    hellaswag = []
    if cfg.eval.hellaswag_items:
        hellaswag = load_items(
            resolve_path(cfg.eval.hellaswag_path), limit=cfg.eval.hellaswag_items
        )
    run_dir = Path(t.runs_dir) / t.run_name
    if accelerator.is_main_process:
        remove_unfinished(run_dir)  # checkpoint folders of a process killed while writing
    accelerator.wait_for_everyone()

    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    model.activation_checkpointing = cfg.runtime.activation_checkpointing
    model.loss_impl = cfg.runtime.loss_impl
    if cfg.runtime.fsdp:
        shard(model)  # before the optimizer, which must hold the sharded parameters
    optimizer = build_optimizer(model, cfg.optim, device.type)
    warn = print if accelerator.is_main_process else lambda _: None
    resume_from, saved = restore(cfg, run_dir, model, optimizer, warn)
    state = {"step": 0, "tokens_seen": 0, "val_loss": None, "best_val_loss": None, "wandb_id": None}
    if saved is not None:
        try:
            loader.load_state_dict(saved["loader"])
        except ValueError as e:  # other data, seed or block_size: the sample order would differ
            raise CheckpointError(
                f"{resume_from}: {e}, or start a new run (another trainer.run_name)"
            ) from e
        state = {key: saved.get(key) for key in state}
    compile_model = (
        cfg.runtime.compile if cfg.runtime.compile is not None else device.type == "cuda"
    )
    compiled = functools.partial(torch.compile, mode=cfg.runtime.compile_mode)
    if cfg.runtime.fsdp:
        optimizer.optimizers = [accelerator.prepare(opt) for opt in optimizer]
        forward = with_autocast(compiled(model) if compile_model else model, accelerator)
        no_sync = functools.partial(fsdp_no_sync, model)
    else:
        ddp_model, *prepared = accelerator.prepare(model, *optimizer)  # DDP with several processes
        optimizer.optimizers = prepared
        forward = compiled(ddp_model) if compile_model else ddp_model
        no_sync = functools.partial(accelerator.no_sync, ddp_model)
    reporter = Reporter(
        accelerator.is_main_process,
        run_dir,
        cfg.logger,
        t.run_name,
        as_dict(cfg),
        resume_step=state["step"] + 1 if resume_from else 0,
        wandb_id=state["wandb_id"],
    )
    reporter.print(
        f"run {run_dir} | {model.num_params():,} parameters | {world} process(es) on {device} | "
        f"precision {accelerator.mixed_precision} | "
        f"compile {f'{compile_model} ({cfg.runtime.compile_mode})' if compile_model else False} | "
        f"{'FSDP full shard' if cfg.runtime.fsdp else 'data parallel'} | "
        f"grad_accum_steps {cfg.grad_accum_steps(world)} | {cfg.max_steps} steps x "
        f"{t.tokens_per_step:,} tokens | train split {train_split.num_tokens:,} tokens"
        + (f" | resuming from {resume_from}" if resume_from else "")
    )
    return Run(cfg, accelerator, run_dir, model, forward, no_sync, optimizer, loader,
               val_windows, hellaswag, reporter, state)  # fmt: skip


def train(cfg: TrainConfig) -> dict:
    """Train per cfg; returns a summary: steps, tokens_seen, val_loss and best_val_loss
    (nats/token, None without validation), checkpoint path, wall_s, and preempted (stopped by
    SIGTERM/SIGUSR1 after writing a checkpoint; run again to continue).

    Raises ConfigError (listing every problem), ShardError or CheckpointError before the first
    step when the config, data or checkpoints cannot run; NumericsError after
    trainer.max_bad_steps non-finite steps in a row (a checkpoint of the last good weights is
    written first).
    """
    run = setup(cfg)
    acc, t, state, max_steps = run.accelerator, cfg.trainer, run.state, cfg.max_steps
    grad_accum = cfg.grad_accum_steps(acc.num_processes)
    if state["step"] >= max_steps:
        run.reporter.print(f"run already complete: {state['step']} of {max_steps} steps done")
    elif state["step"] == 0 and run.val_windows is not None:
        run.validate()  # the untrained baseline, ~ln(vocab_size)
    path, started, bad_steps, stop = None, time.perf_counter(), 0, StopSignal()
    profiler = StepProfiler(cfg.profile.steps, cfg.profile.start, run.run_dir / PROFILE_DIR,
                            acc.device, acc.is_main_process, run.reporter.print)  # fmt: skip
    with stop, profiler, contextlib.closing(run.reporter):
        for step in range(state["step"], max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, max_steps)  # AdamW's; Muon's follows at its own peak
            run.optimizer.set_lr_scale(lr / cfg.optim.max_lr)
            loss = accumulate_gradients(run.forward, run.loader, grad_accum, acc, run.no_sync,
                                        poison=inject("nan", step + 1))  # fmt: skip
            grad_norm = acc.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip or math.inf)
            if isinstance(grad_norm, DTensor):  # FSDP: the norm of all shards together
                grad_norm = grad_norm.full_tensor()
            inject("backward", step + 1)
            # One collective per step: the mean loss, and whether any rank got a stop signal.
            loss, stopping = acc.reduce(torch.stack([loss, torch.tensor(
                float(stop.received is not None), device=acc.device)]), "sum").tolist()  # fmt: skip
            loss, grad_norm = loss / acc.num_processes, float(grad_norm)
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:  # a non-finite step is skipped: the weights stay at the last good state
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            inject("optimizer", step + 1)
            state["step"], state["tokens_seen"] = step + 1, state["tokens_seen"] + t.tokens_per_step
            bad_steps = 0 if finite else bad_steps + 1
            run.log_step(loss, lr, grad_norm, time.perf_counter() - t0, finite, bad_steps)
            profiler.step()
            if bad_steps >= t.max_bad_steps:
                run.save()
                raise NumericsError(
                    f"{bad_steps} steps in a row had a non-finite loss or gradient norm (last: "
                    f"step {step + 1}); the checkpoint holds the last good weights. Lower "
                    "optim.max_lr, raise optim.warmup_steps or check the data, then resume"
                )
            if run.val_windows is not None and should(step + 1, cfg.eval.interval, max_steps):
                run.validate()
            if run.checkpoint_due(step + 1) or stopping:
                path = run.save()
            if stopping:
                cause = stop.received or "a signal to another process"
                run.reporter.print(f"stopping after step {step + 1} on {cause}: resume to continue")
                break
        summary = {
            "steps": state["step"],
            "tokens_seen": state["tokens_seen"],
            "val_loss": state["val_loss"],
            "best_val_loss": state["best_val_loss"],
            "checkpoint": str(path) if path else None,
            "wall_s": time.perf_counter() - started,
            "preempted": state["step"] < max_steps,
        }
        run.reporter.summary(summary, state["tokens_seen"])
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
