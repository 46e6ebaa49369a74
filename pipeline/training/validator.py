"""What training measures while it runs, and when: validation loss on fixed windows, HellaSwag
and a sample from a fixed prompt, every eval.interval steps and at the end."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

from accelerate import Accelerator

from pipeline.config import DataConfig, EvalConfig
from pipeline.data.loader import ValidationWindows
from pipeline.data.shards import open_split
from pipeline.data.tokenizer import get_encoding
from pipeline.model import GPT
from pipeline.scoring.hellaswag import evaluate_hellaswag, load_items, resolve_path
from pipeline.scoring.loss import estimate_loss
from pipeline.scoring.sampling import generate_text
from pipeline.training.reporter import Reporter, RunState, every

SAMPLE_PROMPT = "The meaning of life is"


@dataclass
class Validator:
    """Validates a run per its EvalConfig; build it with `Validator.load`."""

    cfg: EvalConfig
    windows: ValidationWindows | None
    """The fixed validation windows; None when eval.tokens = 0 (no validation)."""
    hellaswag: list
    """HellaSwag items scored at each validation ([] = none)."""
    micro_batch_size: int
    """Sequences per forward pass on each process."""
    seed: int
    """Seeds the sample's generator, so every sample of a run starts alike."""
    max_steps: int
    accelerator: Accelerator
    fsdp: bool
    """The model is sharded: every process takes part in generating the sample, and the
    sharding's mixed-precision policy sets the compute dtype (no autocast)."""

    @classmethod
    def load(
        cls,
        cfg: EvalConfig,
        data: DataConfig,
        block_size: int,
        vocab_size: int,
        micro_batch_size: int,
        seed: int,
        max_steps: int,
        accelerator: Accelerator,
        fsdp: bool,
    ) -> Validator:
        """Open the validation split of data.shard_dir (when eval.tokens > 0) and load the
        HellaSwag items (when eval.hellaswag_items > 0). Raises ShardError, ConfigError (a split
        too small for one window) or HellaSwagError; validating raises ShardError, naming the
        file, for a token id >= vocab_size."""
        windows = None
        if cfg.tokens > 0:
            split = open_split(data.shard_dir, "val", vocab_size, data.verify_checksums)
            windows = ValidationWindows(split, block_size, cfg.tokens, vocab_size)
        hellaswag = []
        if cfg.hellaswag_items:
            hellaswag = load_items(resolve_path(cfg.hellaswag_path), limit=cfg.hellaswag_items)
        return cls(cfg, windows, hellaswag, micro_batch_size, seed, max_steps, accelerator, fsdp)

    @property
    def enabled(self) -> bool:
        """Whether the run validates at all (eval.tokens > 0)."""
        return self.windows is not None

    def due(self, step: int) -> bool:
        """Whether to validate after `step` steps: every eval.interval and at the last step."""
        return self.enabled and every(step, self.cfg.interval, self.max_steps)

    def run(self, model: GPT, state: RunState, reporter: Reporter) -> float:
        """Validation loss (nats/token) on the fixed windows, sharded over the processes and
        reduced; recorded in state and logged. Then HellaSwag, when configured, and on the
        main process (every process under FSDP) a sample from the fixed prompt. Collective:
        every process must call it. Returns the loss."""
        acc, step = self.accelerator, state.step
        reduce = functools.partial(acc.reduce, reduction="sum")
        autocast = contextlib.nullcontext if self.fsdp else acc.autocast
        loss, _ = estimate_loss(
            model,
            self.windows,
            self.micro_batch_size,
            acc.device,
            acc.process_index,
            acc.num_processes,
            autocast=autocast,
            reduce=reduce,
        )
        state.record_val(loss)
        reporter.val_step(step, self.max_steps, loss, state.tokens_seen)
        if self.hellaswag:
            result = evaluate_hellaswag(
                model,
                self.hellaswag,
                acc.device,
                self.micro_batch_size,
                autocast,
                acc.process_index,
                acc.num_processes,
                reduce=reduce,
            )
            text = (
                f"step {step} | HellaSwag acc {result['acc']:.4f} | acc_norm "
                f"{result['acc_norm']:.4f} | {result['n']} items"
            )
            reporter.log("hellaswag", step, {**result, "tokens_seen": state.tokens_seen}, text)
        if self.cfg.sample_tokens and (acc.is_main_process or self.fsdp):
            text = generate_text(
                model, get_encoding(), SAMPLE_PROMPT, self.cfg.sample_tokens, acc.device, self.seed
            )
            reporter.sample(step, state.tokens_seen, SAMPLE_PROMPT, text)
        return loss
