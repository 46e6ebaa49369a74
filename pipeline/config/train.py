"""Schema of the training stage: model, data, optim, and the trainer settings grouped as
trainer (the run, its batch and length), eval, checkpoint, runtime and profile; RENAMED lists
the keys that moved out of trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from pipeline.config.launch import LaunchConfig
from pipeline.model import LOSS_IMPLS, ModelConfig


@dataclass
class DataConfig:
    shard_dir: str = MISSING
    """Folder written by the prepare stage (holds manifest.json)."""
    block_size: int | None = None
    """Tokens per training sample; null = model.block_size. Must not exceed it."""
    verify_checksums: bool = False
    """Check every shard's sha256 against the manifest before training (reads all the data:
    about 10 s per 10B-token dataset per GB/s of disk). Sizes and headers are always checked."""
    allow_other_data: bool = False
    """Let a resumed run continue on other data than its checkpoint was trained on (another
    manifest fingerprint, see pipeline.data.shards.manifest_fingerprint), at the same position
    in the new data's sample order. Off, such a resume stops with exit code 2 naming both
    folders; set it only when the change is intended (e.g. continuing on a larger dataset)."""


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "sqrt")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule.

    adamw: AdamW for every parameter (GPT-3, Brown et al. 2020, appendix B; llm.c's GPT-2).
    muon: Muon (`torch.optim.Muon`; Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/)
    for the 2-D weight matrices inside the transformer blocks, and AdamW (max_lr, betas,
    weight_decay below) for the tied token embedding / output layer, the position embedding,
    biases and LayerNorms, as modded-nanogpt and nanochat split them. The schedule multiplies
    both optimizers' peak rates by the same factor.
    """

    name: str = "adamw"
    """`adamw` or `muon` (set by the `optim` config group: optim=adamw | optim=muon)."""
    max_lr: float = 6e-4
    """Peak learning rate of AdamW (with muon: of the AdamW parameters), reached at the end of
    warmup."""
    min_lr: float = 6e-5
    """AdamW's learning rate at the end of the decay; every rate ends at min_lr/max_lr of its
    peak (GPT-3: 10%)."""
    warmup_steps: int = 700
    """Steps of linear warmup from max_lr/warmup_steps to max_lr."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, applied to 2-D weights only (not biases, LayerNorm)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm (all parameters, both optimizers) to this value; 0
    disables clipping."""
    fused: bool | None = None
    """Fused AdamW kernel; null = on when training on CUDA."""
    schedule: str = "cosine"
    """`cosine`: warmup, then cosine decay to min_lr at the last step (GPT-3). `wsd`:
    warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, max_lr until the last
    decay_fraction of the steps, then a decay to min_lr; a run can be extended from any
    checkpoint taken before its decay (see pipeline.training.optim)."""
    decay_fraction: float = 0.2
    """wsd: fraction of the steps in the final decay, in (0, 1] (Hägele et al. 2024 find 20%
    matches cosine)."""
    decay_shape: str = "linear"
    """wsd: `linear` (modded-nanogpt) or `sqrt`, 1 - sqrt(progress) (Hägele et al. 2024,
    "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", §3)."""
    muon_lr: float = 0.02
    """muon: peak learning rate of the Muon matrices (Keller Jordan's default 0.02)."""
    muon_momentum: float = 0.95
    """muon: Nesterov momentum of Muon."""
    muon_weight_decay: float = 0.0
    """muon: decoupled weight decay of the Muon matrices (multiplied by the current Muon
    learning rate, as torch.optim.Muon does)."""
    muon_ns_steps: int = 5
    """muon: Newton–Schulz iterations per step (torch.optim.Muon's ns_steps; 5 is Keller
    Jordan's default). Each costs three matrix products per matrix, run in bfloat16: on a GPU a
    few percent of the step, on a CPU without bf16 matrix units most of Muon's cost, so fewer
    (3) buys steps in CPU runs at a less exact orthogonalisation."""
    muon_adjust_lr: str = "original"
    """muon: per-matrix learning-rate scale of torch.optim.Muon: `original` (sqrt(max(1,
    rows/cols)), Keller Jordan) or `match_rms_adamw` (0.2·sqrt(max(rows, cols)), Liu et al.
    2025, "Muon is Scalable for LLM Training"), which lets muon_lr take AdamW-sized values."""

    muon_sharded: bool = True
    """muon, on several data-parallel processes: each block matrix's Newton–Schulz update and
    momentum live on one process, which broadcasts the updated weight
    (torch.distributed.optim.ZeroRedundancyOptimizer): 1/N of Muon's work and state per
    process, the same weights bit for bit. false: every process runs Muon on every matrix."""

    def decay_start(self, max_steps: int) -> int:
        """The first step whose rate depends on max_steps: warmup_steps for cosine (its decay
        spans the whole run); for wsd, max_steps minus the max(1, round(decay_fraction ·
        max_steps)) decay steps. Steps before it have the same rate whatever the budget, which
        is what lets a WSD run be extended."""
        if self.schedule != "wsd":
            return self.warmup_steps
        return max_steps - max(1, round(self.decay_fraction * max_steps))

    def problems(self) -> list[str]:
        out = []
        if self.name not in OPTIMIZERS:
            out.append(f"optim.name={self.name!r} is unknown: use optim=adamw or optim=muon")
        if self.max_lr <= 0 or self.min_lr < 0 or self.min_lr > self.max_lr:
            out.append(
                f"optim: need 0 <= min_lr <= max_lr and max_lr > 0 "
                f"(got min_lr={self.min_lr}, max_lr={self.max_lr})"
            )
        if self.warmup_steps < 0:
            out.append(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            out.append("optim.weight_decay and optim.grad_clip must be >= 0")
        if self.schedule not in SCHEDULES:
            out.append(f"optim.schedule={self.schedule!r} is unknown: use cosine or wsd")
        if not 0 < self.decay_fraction <= 1:
            out.append(
                f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]: the share of "
                "the steps spent decaying, e.g. 0.2"
            )
        if self.decay_shape not in DECAY_SHAPES:
            out.append(f"optim.decay_shape={self.decay_shape!r} is unknown: use linear or sqrt")
        if self.name == "muon":
            if self.muon_lr <= 0 or self.muon_weight_decay < 0:
                out.append(
                    f"optim.muon_lr={self.muon_lr} must be > 0 and optim.muon_weight_decay="
                    f"{self.muon_weight_decay} >= 0"
                )
            if not 0 <= self.muon_momentum < 1:
                out.append(f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
            if not 1 <= self.muon_ns_steps < 100:
                out.append(
                    f"optim.muon_ns_steps={self.muon_ns_steps} must be in [1, 100): 5 is "
                    "the default, 3 a cheaper one"
                )
            if self.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
                out.append(
                    f"optim.muon_adjust_lr={self.muon_adjust_lr!r} is unknown: use "
                    "original or match_rms_adamw"
                )
        return out


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The modes torch.compile takes."""
PRECISIONS = ("auto", "bf16", "fp32")
"""auto: bf16 on a CUDA device that supports it, else fp32 (see pipeline.training.runtime)."""


@dataclass
class TrainerConfig:
    """The run, its batch and its length (`trainer.*`)."""

    run_name: str = "gpt2"
    """Run folder name under runs_dir. Fixed (no timestamp) so every rank and every resumed
    launch finds the same folder."""
    runs_dir: str = "runs"
    tokens_per_step: int = 524_288
    """Tokens per optimizer step across all processes (GPT-3 small / llm.c: 2**19 ≈ 0.5M)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on each process."""
    max_steps: int | None = None
    """Optimizer steps of the run; the cosine schedule ends here."""
    max_tokens: int | None = None
    """Alternative to max_steps: max_steps = ceil(max_tokens / tokens_per_step)."""
    log_interval: int = 10
    """Write a train record (stdout, metrics.jsonl, W&B) every this many steps and at the last,
    with the loss averaged over them. Each record costs the host a JSON write, a print and a
    W&B call while the GPU waits for its next step, so not every step."""
    seed: int = 1337
    """Seeds model init, data order and dropout."""
    max_bad_steps: int = 5
    """Stop (after a checkpoint) when this many steps in a row have a non-finite loss or
    gradient norm; each such step is skipped with a warning."""

    def problems(self) -> list[str]:
        out = []
        if (self.max_steps is None) == (self.max_tokens is None):
            out.append("trainer: set exactly one of trainer.max_steps and trainer.max_tokens")
        for key in ("tokens_per_step", "micro_batch_size", "log_interval", "max_bad_steps"):
            if getattr(self, key) < 1:
                out.append(f"trainer.{key}={getattr(self, key)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"trainer.max_steps={self.max_steps} must be >= 1")
        return out


@dataclass
class EvalConfig:
    """What training measures while it runs, and when (`eval.*`)."""

    interval: int = 250
    """Validate every this many steps and at the end; 0 = only at the end."""
    tokens: int = 10_485_760
    """Validation tokens per evaluation (20 x 524,288, as build-nanogpt); 0 = no validation.
    See pipeline.scoring.loss."""
    sample_tokens: int = 64
    """Tokens generated from a fixed prompt at each evaluation (0 = none)."""
    hellaswag_items: int = 0
    """HellaSwag items scored at each evaluation (0 = none), split across processes."""
    hellaswag_path: str | None = None
    """HellaSwag validation file for hellaswag_items; null = download rowanz/hellaswag's."""

    def problems(self) -> list[str]:
        out = []
        for key in ("interval", "tokens", "sample_tokens", "hellaswag_items"):
            if getattr(self, key) < 0:
                out.append(f"eval.{key}={getattr(self, key)} must be >= 0")
        return out


def mirror_problem(url: str) -> str | None:
    """Why fsspec cannot open a checkpoint.mirror URL (an unknown protocol, its package not
    installed, what its file system refuses when built), or None. Reads and writes nothing."""
    import fsspec

    if not url.strip():
        return "empty: give a URL, or null for no mirror"
    try:
        fsspec.core.url_to_fs(url)
    except ImportError as e:  # e.g. s3:// without s3fs
        return f"{' '.join(str(e).split())[:200]} (pip install s3fs for s3://, gcsfs for gs://)"
    except (ValueError, TypeError) as e:
        return (
            f"not a URL fsspec can open ({e}); use a folder, s3://bucket/prefix, "
            "gs://bucket/prefix or hf://models/<repo_id>"
        )
    except Exception as e:  # noqa: BLE001 - a file system's own check (e.g. its credentials)
        return f"cannot be opened ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and where a run continues from
    (`checkpoint.*`)."""

    interval: int = 1000
    """Save a checkpoint every this many steps and at the end; 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """`auto` (newest complete checkpoint of the run, if any), `latest` (the newest, which must
    exist), `never` (fail if the run has checkpoints), or the path of a checkpoint folder."""
    async_save: bool = True
    """Write checkpoints in the background: training waits only while the states are copied
    to host memory (torch.distributed.checkpoint.async_save), and a save in flight completes
    before the run ends or stops; false waits for every file."""
    mirror: str | None = None
    """Copy every complete checkpoint to this fsspec URL in the background (a folder,
    s3://bucket/prefix, gs://..., hf://models/<repo_id>), rotated as the local ones, and resume
    from it when it is newer than the local checkpoints (pipeline.training.checkpoint.mirror);
    null: off."""
    mirror_timeout_s: float = 600.0
    """At the end of a run or on preemption, wait at most this long (seconds) for the upload in
    flight."""

    def problems(self) -> list[str]:
        out = []
        if self.interval < 0:
            out.append(f"checkpoint.interval={self.interval} must be >= 0")
        if self.keep_last < 1:
            out.append(f"checkpoint.keep_last={self.keep_last} must be >= 1")
        why = mirror_problem(self.mirror) if self.mirror is not None else None
        if why:
            out.append(f"checkpoint.mirror={self.mirror}: {why}")
        if self.mirror_timeout_s < 0:
            out.append(f"checkpoint.mirror_timeout_s={self.mirror_timeout_s} must be >= 0")
        return out


@dataclass
class RuntimeConfig:
    """How the steps run: device, precision, compilation, sharding, memory (`runtime.*`)."""

    precision: str = "auto"
    """`bf16` (autocast, fp32 master weights), `fp32`, or `auto` (bf16 where supported)."""
    compile: bool | None = None
    """torch.compile the model; null = on for CUDA."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, or
    max-autotune-no-cudagraphs (longer compilation, possibly faster kernels)."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer states over the processes (FSDP2 full shard,
    one unit per block) instead of replicating them (DDP): for gpt2_large and gpt2_xl."""
    loss_impl: str = "chunked"
    """Output layer + cross-entropy: `chunked` (positions in chunks of at most 1 GiB of float32
    logits on a GPU, 64 MiB on a CPU, never more than 16 chunks; never the whole (B, T, V)
    logits; see pipeline.model.loss_chunk_rows), `full` (the logits
    materialised, nanoGPT's way; more memory) or `liger` (Liger-Kernel's fused kernel, CUDA,
    needs `pip install liger-kernel`)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of storing them: about a
    third more compute for a much larger micro_batch_size."""
    peak_flops: float | None = None
    """Device peak FLOP/s for MFU; null = look up the bf16 dense peak by device name."""
    dist_timeout_s: int = 1800
    """Seconds a collective (all-reduce, barrier) may wait before the process group gives up:
    long enough for every rank to wait while the largest checkpoint is gathered and written
    (gpt2_xl: ~18 GB); torch's default, 10 minutes, is not."""

    def problems(self) -> list[str]:
        out = []
        if self.dist_timeout_s < 1:
            out.append(f"runtime.dist_timeout_s={self.dist_timeout_s} must be >= 1 (seconds)")
        if self.compile_mode not in COMPILE_MODES:
            out.append(f"runtime.compile_mode={self.compile_mode!r}: use one of {COMPILE_MODES}")
        if self.precision not in PRECISIONS:
            out.append(f"runtime.precision={self.precision!r}: use auto, bf16 or fp32")
        if self.loss_impl not in LOSS_IMPLS:
            out.append(f"runtime.loss_impl={self.loss_impl!r}: use one of {LOSS_IMPLS}")
        return out


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (`profile.*`; see pipeline.training.profiling)."""

    steps: int = 0
    """Optimizer steps to record on the main process (0 = off): a trace and an ops table in
    `<run>/profile/`."""
    start: int = 5
    """Steps of this launch left out before profiling (compilation, warm-up); one more warms
    the profiler up."""

    def problems(self) -> list[str]:
        if self.steps < 0 or self.start < 0:
            return [f"profile.steps={self.steps} and profile.start={self.start} must be >= 0"]
        return []


RENAMED = {
    "trainer.eval_interval": "eval.interval",
    "trainer.eval_tokens": "eval.tokens",
    "trainer.sample_tokens": "eval.sample_tokens",
    "trainer.hellaswag_items": "eval.hellaswag_items",
    "trainer.hellaswag_path": "eval.hellaswag_path",
    "trainer.checkpoint_interval": "checkpoint.interval",
    "trainer.keep_last": "checkpoint.keep_last",
    "trainer.resume": "checkpoint.resume",
    "trainer.precision": "runtime.precision",
    "trainer.compile": "runtime.compile",
    "trainer.compile_mode": "runtime.compile_mode",
    "trainer.cpu": "runtime.cpu",
    "trainer.fsdp": "runtime.fsdp",
    "trainer.loss_impl": "runtime.loss_impl",
    "trainer.activation_checkpointing": "runtime.activation_checkpointing",
    "trainer.peak_flops": "runtime.peak_flops",
    "trainer.profile_steps": "profile.steps",
    "trainer.profile_start": "profile.start",
}
"""Training keys that moved out of `trainer` into their own groups: old name -> new name."""


@dataclass
class LoggerConfig:
    kind: str = "none"
    """`none` (stdout and metrics.jsonl only) or `wandb` (also Weights & Biases)."""
    project: str = "gpt2-fineweb"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    """W&B mode: online, offline or disabled; null = the WANDB_MODE variable, else online."""
    init_timeout: float = 60.0
    """Seconds wandb.init may take online (e.g. an unreachable server) before the run logs
    offline instead, with the `wandb sync` command that uploads it later."""
    finish_timeout: float = 120.0
    """Seconds the end of the run waits for W&B's uploads (0 = until done); past it the W&B run
    is marked crashed and may miss its last data, and the process ends."""

    def problems(self) -> list[str]:
        out = []
        if self.init_timeout <= 0 or self.finish_timeout < 0:
            out.append(
                f"logger.init_timeout={self.init_timeout} must be > 0 and "
                f"logger.finish_timeout={self.finish_timeout} >= 0 (seconds)"
            )
        if self.kind not in ("none", "wandb"):
            out.append(f"logger.kind={self.kind!r} is unknown: use none or wandb")
        if self.mode not in (None, "online", "offline", "disabled"):
            out.append(f"logger.mode={self.mode!r}: use online, offline, disabled or null")
        return out


def budget_steps(max_steps: int | None, max_tokens: int | None, tokens_per_step: int) -> int:
    """A run's optimizer steps: max_steps, or ceil(max_tokens / tokens_per_step) when the budget
    is given in tokens (trainer.max_tokens)."""
    return max_steps if max_steps is not None else -(-max_tokens // tokens_per_step)


@dataclass
class TrainConfig:
    """`python -m pipeline.train`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def block_size(self) -> int:
        return self.data.block_size or self.model.block_size

    @property
    def max_steps(self) -> int:
        """The run's optimizer steps (budget_steps of trainer.*)."""
        t = self.trainer
        return budget_steps(t.max_steps, t.max_tokens, t.tokens_per_step)

    @property
    def decay_start(self) -> int:
        """The first step of the schedule's decay (OptimConfig.decay_start of max_steps)."""
        return self.optim.decay_start(self.max_steps)

    def grad_accum_steps(self, world_size: int) -> int:
        """tokens_per_step / (micro_batch_size · block_size · world_size); see problems()."""
        per_pass = self.trainer.micro_batch_size * self.block_size * world_size
        return self.trainer.tokens_per_step // per_pass

    def problems(self, world_size: int = 1) -> list[str]:
        """Every problem of this config for a job of world_size processes."""
        out = (
            self.model.problems()
            + self.optim.problems()
            + self.trainer.problems()
            + self.eval.problems()
            + self.checkpoint.problems()
            + self.runtime.problems()
            + self.profile.problems()
            + self.logger.problems()
            + self.launch.problems()
        )
        if self.data.block_size is not None and not (
            1 <= self.data.block_size <= self.model.block_size
        ):
            out.append(
                f"data.block_size={self.data.block_size} must be between 1 and "
                f"model.block_size={self.model.block_size}: lower it or use a larger model"
            )
            return out
        if 0 < self.eval.tokens <= self.block_size:
            out.append(
                f"eval.tokens={self.eval.tokens} is below one validation window of block_size + "
                f"1 = {self.block_size + 1} tokens: set eval.tokens >= {self.block_size + 1}, "
                "or eval.tokens=0 for no validation"
            )
        t = self.trainer
        if self.optim.name == "muon" and self.runtime.fsdp:
            out.append(
                "optim=muon does not run with runtime.fsdp=true (torch.optim.Muon orthogonalises "
                "whole matrices, FSDP2 gives each process a slice): train with data parallelism "
                "(runtime.fsdp=false, with runtime.activation_checkpointing=true to save memory) "
                "or keep FSDP with optim=adamw"
            )
        if self.optim.schedule == "wsd" and not out and self.decay_start < self.optim.warmup_steps:
            out.append(
                f"optim.schedule=wsd: the decay would start at step {self.decay_start}, before "
                f"warmup ends (optim.warmup_steps={self.optim.warmup_steps}): lower "
                "optim.warmup_steps or optim.decay_fraction, or train more steps"
            )
        per_pass = t.micro_batch_size * self.block_size * world_size
        if t.tokens_per_step >= 1 and per_pass >= 1 and t.tokens_per_step % per_pass:
            out.append(
                f"trainer.tokens_per_step={t.tokens_per_step} is not divisible by "
                f"micro_batch_size·block_size·world_size = {t.micro_batch_size}·{self.block_size}"
                f"·{world_size} = {per_pass}: set tokens_per_step to a multiple of {per_pass} "
                f"(e.g. {max(1, t.tokens_per_step // per_pass) * per_pass}) or change "
                "micro_batch_size"
            )
        return out
