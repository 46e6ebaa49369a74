"""Checkpoints: the whole "where am I" of a run, written atomically, found and rotated.

A checkpoint is a folder `<run_dir>/checkpoints/step_NNNNNNN/` (N = optimizer steps done):
  model.pt       full model state_dict (unsharded, no `module.` / `_orig_mod.` prefixes)
  optimizer.pt   full optimizer state (AdamW, or Muon and AdamW), keyed by parameter name
                 (loads sharded or not, also Muon split over ranks by ZeroRedundancyOptimizer)
  rng.pt         python, numpy, torch CPU and CUDA generator states, as tensors and numbers
  state.json     step, tokens seen, loader position, W&B run id, resolved config, the data
                 (absolute shard folder, manifest fingerprint), and the size and sha256 of
                 every file above (both checked before loading)
It is written under `.step_NNNNNNN.tmp`, every file fsynced, then renamed: a folder named
`step_*` is complete. Only the main process writes (the state is replicated under DDP).
Rotation keeps the newest `keep_last`, the best-validation checkpoint and, for a WSD run, the
newest taken before its decay (`extendable` in state.json), from which the run can be extended;
resuming skips, with a warning, a checkpoint whose files are truncated or unreadable and takes
the one before.

Every file is read with `torch.load(weights_only=True)` (load_file): unpickling can build
tensors, numbers, strings and containers and call nothing else, so a checkpoint from elsewhere
(a hub repo, a colleague) cannot run code. A file that needs more is refused (UnsafeFileError,
exit 2), and resuming stops there instead of falling back to an older checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from pipeline.errors import CheckpointError, UnsafeFileError
from pipeline.files import atomic_dir, is_plain_name, sha256_file, write_failed
from pipeline.model import GPT, ModelConfig
from pipeline.training.faults import inject
from pipeline.training.optim import is_sharded, load_sharded_named_state, sharded_named_state
from pipeline.training.rng import OLD_RNG_GLOBALS, rng_state, set_rng_state

STEP_DIR = re.compile(r"^step_(\d{7,})$")
STATE = "state.json"
MODEL, OPTIMIZER, RNG = "model.pt", "optimizer.pt", "rng.pt"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (unfinished `.tmp` ones excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


UNSAFE_THEN = (
    "delete {folder} (a resumed run then continues from the checkpoint before it) or "
    "get the checkpoint from a source you trust"
)
"""What to do about a refused file of checkpoint `folder`."""


def _refused(path: Path, error: Exception, then: str = UNSAFE_THEN) -> UnsafeFileError:
    """The one-line refusal of a file that torch.load(weights_only=True) would not load, saying
    why: what unpickling it would call (torch's static scan of its pickle), or why it cannot be
    checked; `error`: the loader's own error. `then`: what to do ({folder}: the file's folder)."""
    try:
        calls = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        calls -= _names(OLD_RNG_GLOBALS) if path.name == RNG else set()
    except ValueError:  # "Expected input to be a checkpoint returned by torch.save"
        why = "it is not a file of torch.save, whose contents can be checked before loading"
    except Exception as e:  # noqa: BLE001 - e.g. a pickle opcode that torch.save never writes
        why = f"torch cannot check it before loading ({_first_line(e)})"
    else:
        why = (f"unpickling it would call {', '.join(sorted(calls))}, which can run any code"
               if calls else f"weights-only loading refused it ({_first_line(error)})")  # fmt: skip
    return UnsafeFileError(
        f"{path} was refused and nothing in it was run: {why}. A file this pipeline writes "
        "holds only tensors and plain numbers, so this one was altered or made elsewhere: "
        + then.format(folder=path.parent)
    )


def _first_line(error: Exception) -> str:
    """The line of a pickle error that says what is wrong (torch's own adds advice around it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
    return found.removeprefix("WeightsUnpickler error: ")[:200] or type(error).__name__


def _names(globals_: tuple) -> set[str]:
    """`module.name` of each class or function (or the name given beside it), as torch's scan
    names them."""
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}" for g in globals_}


def load_file(path: str | os.PathLike, allow: tuple = ()) -> Any:
    """torch.load of one checkpoint file onto the CPU with weights_only=True (tensors, numbers,
    strings and containers; plus the classes in `allow`): unpickling can call nothing else, so
    a file from elsewhere cannot run code. Raises UnsafeFileError for a file that needs more,
    CheckpointError for one that cannot be read at all."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's refusal (or a damaged pickle)
        raise _refused(path, e) from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises zip, EOF or runtime errors
        text = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {text})") from None


def check_loads_safely(path: str | os.PathLike, then: str = UNSAFE_THEN) -> None:
    """Refuse a checkpoint folder (e.g. one downloaded from the hub) whose files name anything
    weights_only loading would not call, without loading them: torch's static scan of each
    file's pickle (a file that is not torch.save's zip format is refused too). The scan sees
    the names a pickle spells out; loading stays weights_only in any case (load_file), which
    refuses the rest. `then`: what to do, as in _refused. Raises UnsafeFileError."""
    path = Path(path)
    for name in read_state(path).get("files", {}):
        f = path / name
        allowed = _names(OLD_RNG_GLOBALS) if name == RNG else set()
        try:
            calls = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed
        except (ValueError, pickle.UnpicklingError) as e:  # not torch.save's zip format, or
            raise _refused(f, e, then) from None  # opcodes its pickle protocol never writes
        except Exception as e:  # noqa: BLE001 - a damaged zip
            raise CheckpointError(f"{f} cannot be read ({type(e).__name__}: {e})") from None
        if calls:
            raise _refused(f, pickle.UnpicklingError(", ".join(sorted(calls))), then)


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
    loads into any number of processes, sharded (FSDP, ZeroRedundancyOptimizer) or not.
    Collective under FSDP and with a ZeroRedundancyOptimizer (is_sharded): then every process
    must call it, and only rank 0 gets the states (the others get empty dicts)."""
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    for opt in optimizers:
        if is_sharded(opt):
            opt.consolidate_state_dict(to=0)
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not main and not isinstance(model, FSDPModule):
        return {}, {}
    model_state = get_model_state_dict(model, options=FULL)  # first: under FSDP2 the
    # optimizer's state taken before it fails (KeyError in get_optimizer_state_dict, torch 2.13)
    plain = [opt for opt in optimizers if not is_sharded(opt)]
    parts = [get_optimizer_state_dict(model, plain, options=FULL) if plain else None]
    if main:  # sharded optimizers first, as build_optimizer orders them (Muon, AdamW)
        parts[:0] = [sharded_named_state(model, opt) for opt in optimizers if is_sharded(opt)]
    parts = [part for part in parts if part]
    named = {"state": {name: s for part in parts for name, s in part["state"].items()},
             "param_groups": [g for part in parts for g in part["param_groups"]]}  # fmt: skip
    return model_state, named


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    state: dict,
    keep_last: int,
    rng: dict | None = None,
) -> Path:
    """Write checkpoint `step` of the run, then rotate the run's checkpoints (see rotate).

    model_state, optimizer_state: from full_state(). state: JSON-serialisable (tokens seen,
    loader, config, ...). rng: the RNG states to record (rng_state() of this process, with
    the other processes' under "other_ranks"); None records this process's alone.
    Written under `.step_NNNNNNN.tmp` and renamed when complete (pipeline.files.atomic_dir).
    Returns the checkpoint folder. On any failure the partial folder is removed and earlier
    checkpoints are untouched; a failed write (an OSError, or the RuntimeError "unexpected pos"
    of torch's zip writer on a full disk) raises OutputError saying so.
    """
    final = checkpoint_dir(run_dir, step)
    try:  # pipeline.files.atomic_dir: a failure of any kind removes the partial folder
        with atomic_dir(final, tmp=final.with_name(f".{final.name}.tmp")) as tmp:
            sizes = {MODEL: _save(model_state, tmp / MODEL)}
            inject("checkpoint", step)
            sizes |= {
                OPTIMIZER: _save(optimizer_state, tmp / OPTIMIZER),
                RNG: _save(rng if rng is not None else rng_state(), tmp / RNG),
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
    wrong = _state_problem(state)
    if wrong:
        raise CheckpointError(f"{path / STATE} is not a checkpoint's state ({wrong}); delete "
                              f"{path} to resume from the previous checkpoint")  # fmt: skip
    for name, meta in state.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f} is missing or truncated (expected {meta['bytes']} bytes); delete {path} "
                "to resume from the previous checkpoint"
            )
    return state


_STATE_TYPES = {"step": int, "tokens_seen": int, "config": dict, "loader": dict, "files": dict}
"""The keys of state.json that loading reads, and their JSON types (each optional)."""


def _state_problem(state: object) -> str | None:
    """What makes a parsed state.json unusable (wrong JSON types, a file entry that is not a
    plain file name with its bytes and sha256), or None."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    for key, kind in _STATE_TYPES.items():
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            return f"{key} is {state[key]!r}, not a JSON {kind.__name__}"
    if not isinstance(state.get("config", {}).get("model", {}), dict):
        return "config.model is not a JSON object"
    for name, meta in state.get("files", {}).items():
        if not is_plain_name(name) or not isinstance(meta, dict) or not isinstance(
            meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):  # fmt: skip
            return f"files lists {name!r} without a plain name, its bytes and its sha256"
    return None


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


def newest_good(
    run_dir: str | os.PathLike,
    warn: Callable[[str], None] = print,
    check: Callable[[Path, dict], str | None] = lambda path, state: None,
) -> Path | None:
    """The newest checkpoint of the run that verifies, without loading it: its state.json
    reads, `check(folder, state.json)` passes (it may refuse one by returning the reason, e.g. a
    WSD run extended from after its decay), its files match their sizes and checksums and load
    safely. A truncated, corrupt or refused one is reported through `warn` and skipped in
    favour of the one before it (never loaded silently). Returns None when the run has no
    checkpoint. Raises UnsafeFileError for a file that would run code (no fallback: the user
    decides), CheckpointError when checkpoints exist but none verifies or passes check. (A
    checkpoint that verifies but cannot be applied, e.g. RNG states of the wrong kind, is not
    skipped: loading it raises a CheckpointError that names it.)"""
    found = list_checkpoints(run_dir)
    refused = []
    for path in reversed(found):
        try:
            reason = check(path, read_state(path))
            if reason is None:
                verify(path)
                return path
            refused.append(f"{path.name}: {reason}")
            warn(f"note: not resuming from {path}: {reason}")
        except UnsafeFileError:
            raise  # altered, not damaged: the user decides (the message says how)
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


def load_newest_good(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optimizer,
    warn: Callable[[str], None] = print,
    check: Callable[[Path, dict], str | None] = lambda path, state: None,
    rank: int = 0,
) -> tuple[Path, dict] | None:
    """Load the checkpoint newest_good chooses (see there) into model and optimizer, with this
    process's RNG states (rank, set_rng_state). Returns (folder, state.json) or None when the
    run has no checkpoint. Raises UnsafeFileError or CheckpointError."""
    path = newest_good(run_dir, warn, check)
    if path is None:
        return None
    return path, load_checkpoint(path, model, optimizer, rank=rank, verified=True)


def verify(path: Path) -> dict:
    """A checkpoint folder's state.json, after checking that its files match their recorded
    sizes and checksums and load safely (check_loads_safely). Raises CheckpointError (the file
    and what to do), UnsafeFileError."""
    state = read_state(path)
    verify_checksums(path, state)
    check_loads_safely(path)  # the whole checkpoint, also the files a loader does not read
    return state


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optimizer | None = None,
    restore_rng: bool = True,
    rank: int = 0,
    verified: bool = False,
) -> dict:
    """Load weights (and optimizer state, RNG states) from checkpoint folder `path` into the
    unwrapped model, sharded with FSDP or not (each process reads the files); returns its
    state.json. Every file is read with weights_only (load_file), after check_loads_safely has
    scanned them all. Raises UnsafeFileError for a file that would run code, CheckpointError
    for a damaged one, states that cannot be applied, or weights that do not fit the model
    (another size), naming the first mismatch. verified: verify(path) has passed already
    (its checksums are not computed again)."""
    path = Path(path)
    state = read_state(path) if verified else verify(path)
    weights = load_file(path / MODEL)
    opt_state = load_file(path / OPTIMIZER) if optimizer is not None else None
    rng = load_file(path / RNG, allow=OLD_RNG_GLOBALS) if restore_rng else None
    load = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, weights, options=load)
        if opt_state is not None:
            _load_optimizers(model, optimizer, opt_state, load)
    except (RuntimeError, KeyError, ValueError) as e:  # another architecture: shapes, names
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise CheckpointError(
            f"{path} does not fit this model: {' '.join(lines[:2])}{more}; build the model "
            f"with the config recorded in its {STATE} (model.*), or start a new run"
        ) from e
    if rng is not None:
        try:
            set_rng_state(rng, rank)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(
                f"{path / RNG} holds no RNG states this run can restore ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}); delete {path} to resume from the checkpoint "
                "before it"
            ) from None
    return state


def _load_optimizers(
    model: torch.nn.Module, optimizer: Optimizer, named: dict, options: StateDictOptions
) -> None:
    """Load a full_state optimizer state into the run's optimizers: each rank's part into a
    ZeroRedundancyOptimizer, the rest through set_optimizer_state_dict."""
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    for opt in optimizers:
        if is_sharded(opt):
            named = load_sharded_named_state(model, getattr(opt, "optimizer", opt), named)
    plain = [opt for opt in optimizers if not is_sharded(opt)]
    if plain:
        set_optimizer_state_dict(model, plain, named, options=options)


def load_model(path: str | os.PathLike) -> tuple[GPT, Path, dict]:
    """The model of a checkpoint folder or a run folder (its newest complete checkpoint), in
    eval mode on the CPU, built from the model config the checkpoint records: (model, the
    checkpoint folder, its state.json). The one checkpoint -> model path of the project
    (evaluation, sampling, exports). Raises CheckpointError."""
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    try:
        model = GPT(ModelConfig(**state["config"]["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE} records no model this pipeline can build "
                              f"({type(e).__name__}: {e})") from None  # fmt: skip
    load_checkpoint(ckpt, model, restore_rng=False)
    return model.eval(), ckpt, state
