"""What a training run reports, and where it stands: its state, its throughput, and every
rank-0 side effect.

- `RunState`: the progress a checkpoint records (step, tokens, validation losses, W&B id), and
  `every`, the rule every periodic action (logging, validation, checkpoints) follows.
- `Throughput`: model FLOPs utilisation (MFU) from the device's peak and the model's FLOPs per
  token, both constants of a run, computed once at setup.
- `Reporter`: every print, metrics.jsonl write (the format: pipeline.training.runlog) and W&B
  call of training; its `enabled` flag is the accelerator's `is_main_process`, and other ranks'
  reporters do nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import LoggerConfig
from pipeline.files import write_failed
from pipeline.scoring.loss import perplexity
from pipeline.training import runlog
from pipeline.training.wandb_run import WandbRun

# --------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """The progress of a run, saved in every checkpoint's state.json under these keys."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed by those steps, all processes together."""
    val_loss: float | None = None
    """The latest validation loss (nats/token); None before the first validation."""
    best_val_loss: float | None = None
    """The lowest validation loss so far (nats/token)."""
    wandb_id: str | None = None
    """The W&B run id, so a resumed run logs into the same W&B run."""

    def state_dict(self) -> dict:
        """The fields as a dict, in declaration order (the first keys of state.json)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """Take each field from a checkpoint's state.json (extra keys are ignored; a missing
        one keeps its current value)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, saved.get(f.name, getattr(self, f.name)))

    def advance(self, tokens: int) -> None:
        """Count one optimizer step of `tokens` tokens."""
        self.step, self.tokens_seen = self.step + 1, self.tokens_seen + tokens

    def record_val(self, loss: float) -> None:
        """Note a validation loss (nats/token) and keep the best."""
        best = self.best_val_loss
        self.val_loss, self.best_val_loss = loss, loss if best is None else min(best, loss)


def every(step: int, interval: int, last: int) -> bool:
    """Whether a periodic action runs after `step` steps: at multiples of interval (0 = never)
    and at the last step."""
    return step == last or (interval > 0 and step % interval == 0)


# --------------------------------------------------------------------------- throughput (MFU)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name(); the first matching substring wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121.0e12),
    ("A6000", 154.8e12),
    ("A10G", 70.0e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71.0e12),
]


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device: the override, else the table above, else None (CPU
    or an unknown GPU, for which MFU is not reported)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(
    flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over devices · peak (PaLM,
    Chowdhery et al. 2022, appendix B). None when the peak is unknown."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * devices)


@dataclass(frozen=True)
class Throughput:
    """The constants of a run's MFU."""

    flops_per_token: int
    """Training FLOPs per token (pipeline.model.GPT.flops_per_token at the run's block_size)."""
    peak: float | None
    """Peak bf16 FLOP/s of one device (peak_flops); None: MFU is not reported."""
    devices: int
    """Processes (one device each) sharing the work."""

    def mfu(self, tokens_per_s: float) -> float | None:
        """MFU of the whole job at tokens_per_s (all processes together); None without a peak."""
        return mfu(self.flops_per_token, tokens_per_s, self.peak, self.devices)


# --------------------------------------------------------------------------- reporting

CHECKPOINTS_INTACT = (
    "metrics.jsonl keeps its complete records and the checkpoints are intact: "
    "free disk space and run the same command again (it resumes from the "
    "newest checkpoint, or starts again when the run has none)"
)


def main_print(enabled: bool) -> Callable[..., None]:
    """print, flushed, where enabled (the main process); elsewhere a function that does nothing.
    The gate for lines printed before a run's Reporter exists (resuming, checkpoints). Each
    line is one write, so lines printed by the checkpoint mirror's thread never land inside a
    line of the training thread's."""

    def say(*args: Any) -> None:
        print(" ".join(map(str, args)) + "\n", end="", flush=True)

    return say if enabled else lambda *args: None


class Reporter:
    """Writes metrics to stdout, `<run_dir>/metrics.jsonl` and, with logger.kind=wandb, W&B.

    Only when `enabled` (the main process). `resume_step`: metrics of steps ≥ it are dropped
    from an existing metrics.jsonl, so a resumed run does not repeat steps.
    """

    def __init__(
        self,
        enabled: bool,
        run_dir: Path,
        cfg: LoggerConfig,
        run_name: str,
        config: dict,
        resume_step: int = 0,
        wandb_id: str | None = None,
    ):
        self.enabled = enabled
        self.wandb = None
        self.wandb_id = wandb_id
        self.samples: list[list] = []  # W&B table rows: step, tokens_seen, prompt, sample
        self.steps_timed = self.tokens_timed = 0  # completed steps this session, their tokens
        self.seconds_timed = self.flops_timed = 0.0  # their seconds; MFU x seconds
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / runlog.METRICS
        try:
            runlog.truncate(self.path, resume_step)
            self.file = open(self.path, "a")
        except OSError as e:
            raise write_failed(self.path, e, CHECKPOINTS_INTACT) from e
        if cfg.kind == "wandb":
            self.wandb = WandbRun(cfg, run_dir, run_name, config, wandb_id, self.print)
            self.wandb_id = self.wandb.id

    def print(self, *args: Any) -> None:
        main_print(self.enabled)(*args)

    def log(self, kind: str, step: int, metrics: dict[str, float], text: str | None = None) -> None:
        """Record metrics of `kind` (train, val, sample) at optimizer step `step`; print `text`
        (or a default rendering)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **metrics}
        complete = os.fstat(self.file.fileno()).st_size  # bytes: every earlier write was flushed
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: close now, so closing later cannot fail again,
            with contextlib.suppress(OSError):  # and cut the part of this record written
                self.file.close()
            with contextlib.suppress(OSError):
                os.truncate(self.path, complete)
            raise write_failed(self.path, e, CHECKPOINTS_INTACT) from e
        if self.wandb is not None:
            logged = {f"{kind}/{k}": v for k, v in metrics.items()}
            if "tokens_seen" in metrics:
                logged["tokens_seen"] = metrics["tokens_seen"]
            self.wandb.log(logged, step)
        self.print(
            text or f"{kind} step {step}: " + ", ".join(f"{k} {v}" for k, v in metrics.items())
        )

    def time_step(self, tokens: int, step_time_s: float, mfu: float | None) -> None:
        """Count one completed step (tokens, seconds, MFU) for the end-of-run means."""
        self.steps_timed += 1
        self.tokens_timed += tokens
        self.seconds_timed += step_time_s
        self.flops_timed += (mfu or 0.0) * step_time_s

    def train_step(
        self,
        step: int,
        max_steps: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_step: int,
        step_time_s: float,
        mfu: float | None,
        tokens_seen: int,
        num_processes: int = 1,
        peak_memory: int | None = None,
    ) -> None:
        """Log a train record at optimizer step `step`: loss (nats/token) and grad norm, the
        means over the steps since the previous record, lr at this step, tokens/s of the whole
        job and per process (GPU) and MFU (per GPU, the same for the job) over those steps,
        their mean step time (s); on CUDA this process's peak memory so far (bytes; logged in
        GiB)."""
        rate = tokens_per_step / step_time_s
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": rate,
            "tokens_per_s_per_gpu": rate / num_processes,
            "mfu": mfu,
            "step_time_s": step_time_s,
            "tokens_seen": tokens_seen,
        }
        if peak_memory is not None:
            metrics["peak_memory_gib"] = peak_memory / 2**30
        shown_mfu = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        self.log(
            "train",
            step,
            metrics,
            f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
            f"{rate:,.0f} tok/s"
            + (f" ({rate / num_processes:,.0f}/gpu)" if num_processes > 1 else "")
            + f" | mfu {shown_mfu} | {1000 * step_time_s:.0f} ms",
        )

    def val_step(self, step: int, max_steps: int, loss: float, tokens_seen: int) -> None:
        """Log a validation result: loss (nats/token) and perplexity exp(loss) (inf once that
        overflows: a diverged run is logged, not crashed)."""
        self.log(
            "val",
            step,
            {"loss": loss, "perplexity": perplexity(loss), "tokens_seen": tokens_seen},
            f"step {step}/{max_steps} | val loss {loss:.4f} | perplexity {perplexity(loss):.2f}",
        )

    def sample(self, step: int, tokens_seen: int, prompt: str, text: str) -> None:
        """Print a generated sample; in W&B, a table of every sample so far (one row each)."""
        if not self.enabled:
            return
        self.print(f"sample: {text}")
        if self.wandb is not None:
            self.samples.append([step, tokens_seen, prompt, text])
            columns = ["step", "tokens_seen", "prompt", "sample"]
            self.wandb.table("samples", columns, self.samples, step)

    def summary(self, summary: dict, tokens_seen: int) -> str:
        """The end-of-run table: tokens seen, wall time, mean tokens/s and MFU of the steps
        timed in this process's session, best and final validation loss, checkpoint. Printed,
        and stored as the W&B run summary. Returns the table."""
        if not self.enabled:
            return ""
        mean_rate = self.tokens_timed / self.seconds_timed if self.seconds_timed else None
        mean_mfu = self.flops_timed / self.seconds_timed if self.seconds_timed else None
        rows = {
            "steps": summary["steps"],
            "tokens seen": f"{tokens_seen:,}",
            "wall time": f"{summary['wall_s']:,.1f} s",
            "mean tokens/s": "n/a" if mean_rate is None else f"{mean_rate:,.0f}",
            "mean MFU": "n/a" if not mean_mfu else f"{100 * mean_mfu:.1f}%",
            "best val loss": _fmt(summary["best_val_loss"]),
            "final val loss": _fmt(summary["val_loss"]),
            "checkpoint": summary["checkpoint"] or "none written",
        }
        width = max(map(len, rows))
        table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())
        self.print("run summary\n" + table)
        if self.wandb is not None:
            self.wandb.summary(
                {
                    "best_val_loss": summary["best_val_loss"],
                    "final_val_loss": summary["val_loss"],
                    "tokens_seen": tokens_seen,
                    "mean_tokens_per_s": mean_rate,
                    "mean_mfu": mean_mfu,
                }
            )
        return table

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f} (perplexity {perplexity(loss):,.2f})"
