"""Reading what a training run wrote: its metrics (through pipeline.training.runlog), its
checkpoints' weights, its offline W&B record."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.training.checkpoint.folder import list_checkpoints, model_tensors
from pipeline.training.checkpoint.tensors import saved_state
from pipeline.training.runlog import read_records

TIMING = ("tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "mfu")
"""metrics.jsonl fields that vary from run to run (wall-clock measurements)."""


def records(run_dir: Path, kind: str) -> list[dict]:
    """metrics.jsonl entries of one kind (train, val, skip), without the timing fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(run_dir, kind)]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint folder, as saved."""
    return model_tensors(checkpoint)


def optimizer_state(checkpoint: Path) -> dict:
    """A checkpoint's optimizer state as saved: {"state": {name: {key: tensor}},
    "param_groups": [...]}."""
    state, groups = {}, {}
    for key, value in saved_state(checkpoint, "optimizer.").items():
        kind, _, rest = key.removeprefix("optimizer.").partition(".")
        if kind == "state":
            name, _, entry = rest.rpartition(".")
            state.setdefault(name, {})[entry] = value
        else:  # param_groups.<index>.<key>
            index, _, entry = rest.partition(".")
            groups.setdefault(int(index), {})[entry] = value
    return {"state": state, "param_groups": [groups[i] for i in sorted(groups)]}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's newest checkpoint."""
    return weights(list_checkpoints(run_dir)[-1])


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


def assert_identical(a: Path, b: Path) -> None:
    """Two run folders logged the same losses and ended with bit-identical final weights."""
    assert records(a, "train") == records(b, "train")
    assert records(a, "val") == records(b, "val")
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
