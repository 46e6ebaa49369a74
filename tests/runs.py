"""Reading what a training run wrote, shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pipeline.config import TrainConfig, conf_dir, register_configs, to_dataclass
from pipeline.training.checkpoint import list_checkpoints

TIMING = ("tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "mfu")
"""metrics.jsonl fields that vary from run to run (wall-clock measurements)."""


def records(run_dir: Path, kind: str) -> list[dict]:
    """metrics.jsonl entries of one kind (train, val, skip), without the timing fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r["kind"] == kind]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint folder."""
    return torch.load(checkpoint / "model.pt", weights_only=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's newest checkpoint."""
    return weights(list_checkpoints(run_dir)[-1])


def tiny_run(shard_dir: Path, runs_dir: Path, run_name: str, *settings: str) -> list[str]:
    """Hydra overrides of a 2-layer GPT-2 on 64-token windows on the CPU: 512 tokens per step
    in micro-batches of 4, lr 1e-2 to 1e-3 after 2 warm-up steps, no samples; `settings` add
    the rest (steps, intervals, seed)."""
    return [
        "model=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", f"data.shard_dir={shard_dir}", f"trainer.runs_dir={runs_dir}",
        f"trainer.run_name={run_name}", "trainer.tokens_per_step=512",
        "trainer.micro_batch_size=4", "eval.sample_tokens=0", "runtime.cpu=true",
        "optim.max_lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=2", *settings,
    ]  # fmt: skip


def train_config(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml composed with Hydra overrides, as `python -m pipeline.train` does."""
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_dataclass(compose("train", overrides=overrides))


def wandb_run_record(offline_run: Path):
    """The `run` record (id, display name, group, project) of an offline W&B run folder, read
    from its transaction log `run-<id>.wandb`: a LevelDB-style log (7-byte file header, 32 KiB
    blocks, records with a 7-byte header: crc32, length, type 1 full/2 first/3 middle/4 last)
    of protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(offline_run.glob("run-*.wandb")).read_bytes()
    offset, pending = 7, b""
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # block trailer too short for a header
            offset += 32768 - offset % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        payload, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise ValueError(f"{offline_run}: no run record")
