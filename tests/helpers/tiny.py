"""The tiny training run every training test builds on, one way: Hydra overrides of
conf/train.yaml, composed as `python -m pipeline.train` composes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from pipeline.config import RENAMED, TrainConfig, conf_dir, register_configs, to_dataclass


def tiny_run(shard_dir: Path, runs_dir: Path, run_name: str, *settings: str) -> list[str]:
    """Hydra overrides of a 2-layer GPT-2 on 64-token windows on the CPU: 512 tokens per step
    in micro-batches of 4, lr 1e-2 to 1e-3 after 2 warm-up steps, no samples, a train record
    every step; `settings` add the rest (steps, intervals, seed)."""
    return [
        "model=tiny",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=64",
        f"data.shard_dir={shard_dir}",
        f"trainer.runs_dir={runs_dir}",
        f"trainer.run_name={run_name}",
        "trainer.tokens_per_step=512",
        "trainer.micro_batch_size=4",
        "eval.sample_tokens=0",
        "runtime.cpu=true",
        "optim.max_lr=1e-2",
        "optim.min_lr=1e-3",
        "optim.warmup_steps=2",
        "trainer.log_interval=1",
        *settings,
    ]


def train_config(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml composed with Hydra overrides, as `python -m pipeline.train` does."""
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_dataclass(compose("train", overrides=overrides))


def _override(key: str, value: Any) -> str:
    """`group.key=value` for a small_config setting (trainer field, or a moved one by its old
    flat name: eval_interval -> eval.interval; see pipeline.config.RENAMED)."""
    dotted = RENAMED.get(f"trainer.{key}", f"trainer.{key}")
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"{dotted}={text}"


def small_config(shard_dir: Path, runs_dir: Path, **settings: Any) -> TrainConfig:
    """The tiny run (tiny_run) as a TrainConfig: 6 steps of 512 tokens in micro-batches of 4
    (two accumulation steps), validation on 2,048 tokens and a checkpoint every 3 steps, seed
    7, run name `run`. `settings` change trainer fields, or moved ones by their old flat names
    (eval_interval=1, checkpoint_interval=0, keep_last=1, resume="never", ...)."""
    defaults = dict(
        run_name="run",
        max_steps=6,
        eval_interval=3,
        eval_tokens=2048,
        checkpoint_interval=3,
        seed=7,
    )
    merged = {**defaults, **settings}
    run_name = merged.pop("run_name")
    overrides = [_override(k, v) for k, v in merged.items()]
    return train_config(tiny_run(shard_dir, runs_dir, run_name, *overrides))
