"""Checkpoints: the whole "where am I" of a run, written atomically, found and rotated.

A checkpoint is a folder `<run_dir>/checkpoints/step_NNNNNNN/` (N = optimizer steps done):
  model.pt       full model state_dict (unsharded, no `module.` / `_orig_mod.` prefixes)
  optimizer.pt   full optimizer state (AdamW, or Muon and AdamW), keyed by parameter name
                 (loads sharded or not)
  rng.pt         python, numpy, torch CPU and CUDA generator states
  state.json     step, tokens seen, loader position, W&B run id, resolved config, the data
                 (absolute shard folder, manifest fingerprint), and the size and sha256 of
                 every file above (both checked before loading)
It is written under `.step_NNNNNNN.tmp`, every file fsynced, then renamed: a folder named
`step_*` is complete. Only the main process writes (the state is replicated under DDP).
Rotation keeps the newest `keep_last`, the best-validation checkpoint and, for a WSD run, the
newest taken before its decay (`extendable` in state.json), from which the run can be extended;
resuming skips, with a warning, a checkpoint whose files are truncated or unreadable and takes
the one before.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.errors import CheckpointError
from pipeline.files import atomic_dir, sha256_file, write_failed
from pipeline.model import GPT, ModelConfig
from pipeline.training.faults import inject

STEP_DIR = re.compile(r"^step_(\d{7,})$")
STATE = "state.json"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (unfinished `.tmp` ones excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> dict:
    """torch.save obj to path, fsynced; returns its size (bytes) and sha256 for state.json."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


Optimizer = torch.optim.Optimizer | list[torch.optim.Optimizer]
"""One torch optimizer or several over disjoint parameters (Muon and AdamW)."""


def full_state(model: torch.nn.Module, optimizer: Optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state, unsharded, on the CPU: parameter names as in the
    unwrapped model (no `module.`/`_orig_mod.` prefixes), optimizer state keyed by those names
    (several optimizers merge into one dict: their param_groups in order), so a checkpoint
    loads into any number of processes, sharded (FSDP) or not. Collective under FSDP: every
    process must call it."""
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(
        model, optimizer, options=FULL
    )


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of the run, then rotate the run's checkpoints (see rotate).

    model_state, optimizer_state: from full_state(). state: JSON-serialisable (tokens seen,
    loader, config, ...).
    Written under `.step_NNNNNNN.tmp` and renamed when complete (pipeline.files.atomic_dir).
    Returns the checkpoint folder. On any failure the partial folder is removed and earlier
    checkpoints are untouched; a failed write (an OSError, or the RuntimeError "unexpected pos"
    of torch's zip writer on a full disk) raises OutputError saying so.
    """
    final = checkpoint_dir(run_dir, step)
    try:  # pipeline.files.atomic_dir: a failure of any kind removes the partial folder
        with atomic_dir(final, tmp=final.with_name(f".{final.name}.tmp")) as tmp:
            sizes = {"model.pt": _save(model_state, tmp / "model.pt")}
            inject("checkpoint", step)
            sizes |= {
                "optimizer.pt": _save(optimizer_state, tmp / "optimizer.pt"),
                "rng.pt": _save(rng_state(), tmp / "rng.pt"),
            }
            with open(tmp / STATE, "w") as f:
                json.dump({**state, "step": step, "files": sizes}, f, indent=2)
    except (OSError, RuntimeError) as e:  # torch's zip writer: RuntimeError on a full disk
        raise write_failed(final, e, "no partial checkpoint is left and earlier checkpoints are "
                           "intact: free disk space and run the same command again (it resumes "
                           "from the newest checkpoint)") from e  # fmt: skip
    rotate(run_dir, keep_last)
    return final


def rotate(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete complete checkpoints except the newest keep_last, the one with the lowest
    validation loss and the newest marked `extendable` (a WSD run's last checkpoint before its
    decay); returns the deleted folders. Runs only after a new checkpoint is complete, so the
    newest good checkpoint is never among them."""
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    states = {p: _state(p) for p in found}
    scored = [(v, p) for p in found if (v := states[p].get("val_loss")) is not None]
    if scored:
        keep.add(min(scored)[1])
    extendable = [p for p in found if states[p].get("extendable")]
    if extendable:
        keep.add(extendable[-1])
    deleted = [p for p in found if p not in keep]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    return deleted


def _state(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def remove_unfinished(run_dir: str | os.PathLike) -> list[Path]:
    """Delete checkpoint folders left half-written by a killed process (`.step_*.tmp`)."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(root.glob(".step_*.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def read_state(path: str | os.PathLike) -> dict:
    """state.json of a checkpoint folder, after checking that every file has its recorded size.
    Raises CheckpointError for a missing, incomplete or corrupt checkpoint."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / STATE} is corrupt ({e})") from None
    for name, meta in state.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f} is missing or truncated (expected {meta['bytes']} bytes); delete {path} "
                "to resume from the previous checkpoint"
            )
    return state


def verify_checksums(path: Path, state: dict) -> None:
    """Compare every file's sha256 with state.json (reads every byte). Raises CheckpointError."""
    for name, meta in state.get("files", {}).items():
        if sha256_file(path / name) != meta["sha256"]:
            raise CheckpointError(
                f"{path / name} does not match its sha256 in {STATE} (corrupt); delete {path} "
                "to resume from the previous checkpoint"
            )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder.
    Raises CheckpointError when there is none."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"no complete checkpoint in {path}: pass a run folder that has "
            "checkpoints/step_*/ or a checkpoint folder itself"
        )
    return found[-1]


def load_newest_good(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optimizer,
    warn: Callable[[str], None] = print,
    check: Callable[[Path, dict], str | None] = lambda path, state: None,
) -> tuple[Path, dict] | None:
    """Load the newest checkpoint of the run that loads cleanly; a truncated or corrupt one is
    reported through `warn` and skipped in favour of the one before it (never loaded silently).
    `check(folder, state.json)` may also refuse a checkpoint by returning the reason (e.g. a WSD run
    extended from before its decay); it is reported and skipped the same way.
    Returns (folder, state.json) or None when the run has no checkpoint. Raises CheckpointError
    when checkpoints exist but none loads or passes check."""
    found = list_checkpoints(run_dir)
    refused = []
    for path in reversed(found):
        try:
            reason = check(path, read_state(path))
            if reason is None:
                return path, load_checkpoint(path, model, optimizer)
            refused.append(f"{path.name}: {reason}")
            warn(f"note: not resuming from {path}: {reason}")
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {path}: {e}")
    if refused:
        raise CheckpointError(
            f"no checkpoint in {Path(run_dir) / 'checkpoints'} can continue this run "
            f"({refused[0]}): resume with the run's own budget, or start a new run (another "
            "trainer.run_name)"
        )
    if found:
        raise CheckpointError(
            f"none of the {len(found)} checkpoints in {Path(run_dir) / 'checkpoints'} loads: "
            "start a new run (another trainer.run_name) or restore a checkpoint"
        )
    return None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optimizer | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load weights (and optimizer state, RNG states) from checkpoint folder `path` into the
    unwrapped model, sharded with FSDP or not (each process reads the files); returns its
    state.json. Raises CheckpointError, also when the weights do not fit the model (another
    size), naming the first mismatch."""
    path = Path(path)
    state = read_state(path)
    verify_checksums(path, state)
    try:
        weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        opt_state = rng = None
        if optimizer is not None:
            opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if restore_rng:
            rng = torch.load(path / "rng.pt", weights_only=False)
    except Exception as e:  # a corrupt file raises pickle, zip or runtime errors
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    load = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, weights, options=load)
        if opt_state is not None:
            set_optimizer_state_dict(model, optimizer, opt_state, options=load)
    except (RuntimeError, KeyError, ValueError) as e:  # another architecture: shapes, names
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise CheckpointError(
            f"{path} does not fit this model: {' '.join(lines[:2])}{more}; build the model "
            f"with the config recorded in its {STATE} (model.*), or start a new run"
        ) from e
    if rng is not None:
        set_rng_state(rng)
    return state


def load_model(path: str | os.PathLike) -> tuple[GPT, Path, dict]:
    """The model of a checkpoint folder or a run folder (its newest complete checkpoint), in
    eval mode on the CPU, built from the model config the checkpoint records: (model, the
    checkpoint folder, its state.json). The one checkpoint -> model path of the project
    (evaluation, sampling, exports). Raises CheckpointError."""
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    model = GPT(ModelConfig(**state["config"]["model"]))
    load_checkpoint(ckpt, model, restore_rng=False)
    return model.eval(), ckpt, state
