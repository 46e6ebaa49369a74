"""Checkpoints: the whole "where am I" of a run, written atomically, found and rotated.

A checkpoint is a folder `<run_dir>/checkpoints/step_NNNNNNN/` (N = optimizer steps done):
  __<rank>_<n>.distcp  the model's and optimizers' tensors, each process its own part, and
  .metadata            their index, through torch.distributed.checkpoint (DCP; see
                       pipeline.training.checkpoint.tensors): every process writes in parallel
                       and reads back only what it holds, on any number of processes
  rng.pt               python, numpy, torch CPU and CUDA generator states of every process, as
                       tensors and numbers
  state.json           "format": 2, step, tokens seen, loader position, W&B run id, resolved
                       config, the data (absolute shard folder, manifest fingerprint), and the
                       size and sha256 of every file above (both checked before loading)
Every process writes its tensors under `.step_NNNNNNN.tmp` (asynchronously: training goes on
while they are written); once all are written the main process adds rng.pt and state.json,
fsyncs every file and renames the folder: a folder named `step_*` is complete. Checkpoints of
format 1 (the whole model in model.pt and the optimizers' state in optimizer.pt, written by the
main process) still load.
Rotation keeps the newest `keep_last`, the best-validation checkpoint and, for a WSD run, the
newest taken before its decay (`extendable` in state.json), from which the run can be extended;
resuming skips, with a warning, a checkpoint whose files are truncated or unreadable and takes
the one before.

Every file is read weights-only (load_file; DCP's index and values through
tensors.SafeReader and SafePlanner): unpickling can build tensors, numbers, strings
and containers and call nothing else, so a checkpoint from elsewhere (a hub repo, a colleague)
cannot run code. A file that needs more is refused (UnsafeFileError, exit 2), and resuming
stops there instead of falling back to an older checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from pipeline.errors import CheckpointError, PipelineError, UnsafeFileError
from pipeline.files import fsync_dir, fsync_tree, is_plain_name, sha256_file, write_failed
from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint.safe_load import (
    RNG,
    UNSAFE_THEN,
    global_names,
    load_file,
    refused_file,
)
from pipeline.training.checkpoint.tensors import (  # noqa: F401 (some re-exported)
    METADATA,
    MODEL,
    OPTIMIZER,
    TENSOR_FILE_SUFFIX,
    TensorSaver,
    load_format_1,
    load_tensor_state,
    read_metadata_safely,
    saved_state,
    tensor_files,
    tensor_state,
    weights_sha256,
    when_done,
)
from pipeline.training.faults import inject
from pipeline.training.rng import OLD_RNG_GLOBALS, rng_state, set_rng_state

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


def check_loads_safely(path: str | os.PathLike, then: str = UNSAFE_THEN) -> None:
    """Refuse a checkpoint folder (e.g. one downloaded from the hub) whose files name anything
    weights_only loading would not call, without loading them: torch's static scan of each
    file's pickle (a file that is not torch.save's zip format is refused too). The scan sees
    the names a pickle spells out; loading stays weights_only in any case (load_file), which
    refuses the rest. `then`: what to do, as in refused_file. Raises UnsafeFileError."""
    path = Path(path)
    for name in read_state(path).get("files", {}):
        f = path / name
        if name == METADATA:  # DCP's index: unpickled weights-only, DCP's classes allowed
            with open(f, "rb") as index:
                read_metadata_safely(index, f, then)
            continue
        if name.endswith(TENSOR_FILE_SUFFIX):  # read by DCP weights-only (SafePlanner)
            continue
        allowed = global_names(OLD_RNG_GLOBALS) if name == RNG else set()
        try:
            calls = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed
        except (ValueError, pickle.UnpicklingError) as e:  # not torch.save's zip format, or
            raise refused_file(f, e, then) from None  # opcodes its pickle protocol never writes
        except Exception as e:  # noqa: BLE001 - a damaged zip
            raise CheckpointError(f"{f} cannot be read ({type(e).__name__}: {e})") from None
        if calls:
            raise refused_file(f, pickle.UnpicklingError(", ".join(sorted(calls))), then)


def _save(obj: Any, path: Path) -> dict:
    """torch.save obj to path, fsynced; returns its size (bytes) and sha256 for state.json."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


Optimizer = torch.optim.Optimizer | list[torch.optim.Optimizer]
"""One torch optimizer or several over disjoint parameters (Muon and AdamW)."""
FORMAT = 2
"""state.json's "format" of the checkpoints written now; format 1 (no key) is read too."""


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: Optimizer | None,
    state: dict | None,
    keep_last: int,
    rng: dict | None = None,
    saver: TensorSaver | None = None,
) -> tuple[Path, Future]:
    """Write checkpoint `step` of the run, then rotate the run's checkpoints (see rotate).

    Every process calls it (collective under torch.distributed) with the unwrapped model and
    its optimizers (sharded or not): each writes its own tensors (tensors.py). state:
    JSON-serialisable (tokens seen, loader, config, ...) on the main process, None on the
    others. rng: the RNG states to record (rng_state() of this process, with the other
    processes' under "other_ranks"); None records this process's alone. saver: asynchronous
    or not (TensorSaver); None writes synchronously.

    Returns (the checkpoint folder, a future) once the live tensors may change again. The
    future completes when the checkpoint is complete: on the main process once rng.pt and
    state.json are written, every file fsynced, `.step_NNNNNNN.tmp` renamed and older
    checkpoints rotated; elsewhere once this process's files are written. On any failure the
    partial folder is removed and earlier checkpoints are untouched; a failed write (an
    OSError, e.g. a full disk, or DCP's report of one) raises OutputError saying so, from
    this call or from the future.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    main = state is not None
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the folder exists before any process writes into it
    saver = saver or TensorSaver(False, torch.device("cpu"))
    try:
        written = saver.save(tensor_state(model, optimizer), tmp)
    except (OSError, RuntimeError, CheckpointException) as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, e) from None
    if not main:
        return final, when_done(written, lambda: None, lambda e: _write_failed(final, e))
    finish = functools.partial(_finish, tmp, final, step, state, rng, keep_last)
    return final, when_done(written, finish, functools.partial(_abandon, tmp, final))


def _abandon(tmp: Path, final: Path, error: BaseException) -> BaseException:
    """The main process's cleanup of a save that failed on any process: the partial folder is
    removed; returns the error to raise (OutputError for a failed write)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, (OSError, RuntimeError, CheckpointException)) and not isinstance(
        error, PipelineError
    ):
        return _write_failed(final, error)
    return error


def _finish(
    tmp: Path, final: Path, step: int, state: dict, rng: dict | None, keep_last: int
) -> None:
    """The main process's end of a save, once every process's tensors are written: rng.pt,
    state.json with every file's size and sha256, fsync, rename, rotate."""
    try:
        inject("stall", step)
        inject("checkpoint", step)
        sizes = {RNG: _save(rng if rng is not None else rng_state(), tmp / RNG)}
        for name in tensor_files(tmp):
            sizes[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        with open(tmp / STATE, "w") as f:
            json.dump({**state, "format": FORMAT, "step": step, "files": sizes}, f, indent=2)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except (OSError, RuntimeError) as e:
        raise _write_failed(final, e) from None  # _abandon removes the partial folder
    rotate(final.parent.parent, keep_last)


def _write_failed(final: Path, error: BaseException) -> Exception:
    """The OutputError of a checkpoint that could not be written (DCP's CheckpointException:
    the first process's error)."""
    if isinstance(error, CheckpointException):
        error = next(iter(error.failures.values()))[0]
    return write_failed(
        final,
        error,
        "no partial checkpoint is left and earlier checkpoints "
        "are intact: free disk space and run the same command again (it "
        "resumes from the newest checkpoint)",
    )


def rotate(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete complete checkpoints except the newest keep_last, the one with the lowest
    validation loss and the newest marked `extendable` (a WSD run's last checkpoint before its
    decay); returns the deleted folders. Runs only after a new checkpoint is complete, so the
    newest good checkpoint is never among them."""
    found = list_checkpoints(run_dir)
    keep = keep_by_rotation({i: _state(p) for i, p in enumerate(found)}, keep_last)
    deleted = [p for i, p in enumerate(found) if i not in keep]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    return deleted


def keep_by_rotation(states: dict[int, dict], keep_last: int) -> set[int]:
    """Which checkpoints rotation keeps, by key (ordered as their steps) to state.json: the
    newest keep_last, the lowest val_loss and the newest `extendable`."""
    order = sorted(states)
    keep = set(order[-keep_last:])
    scored = [(v, k) for k in order if (v := states[k].get("val_loss")) is not None]
    if scored:
        keep.add(min(scored)[1])
    extendable = [k for k in order if states[k].get("extendable")]
    if extendable:
        keep.add(extendable[-1])
    return keep


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
    wrong = state_problem(state)
    if wrong:
        raise CheckpointError(
            f"{path / STATE} is not a checkpoint's state ({wrong}); delete "
            f"{path} to resume from the previous checkpoint"
        )
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


def state_problem(state: object) -> str | None:
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
        if (
            not is_plain_name(name)
            or not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
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
    rng = load_file(path / RNG, allow=OLD_RNG_GLOBALS) if restore_rng else None
    try:
        if MODEL in state.get("files", {}):  # format 1: whole states, every process reads all
            load_format_1(path, model, optimizer)
        else:
            load_tensor_state(path, model, optimizer)
    except CheckpointException as e:  # DCP's, from any process: the first one's error
        error = next(iter(e.failures.values()))[0]
        if isinstance(error, (UnsafeFileError, CheckpointError)):
            raise error from None
        raise _does_not_fit(path, error) from None
    except (RuntimeError, KeyError, ValueError) as e:  # another architecture: shapes, names
        raise _does_not_fit(path, e) from e
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


def _does_not_fit(path: Path, error: BaseException) -> CheckpointError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return CheckpointError(
        f"{path} does not fit this model: {' '.join(lines[:2])}{more}; build the model "
        f"with the config recorded in its {STATE} (model.*), or start a new run"
    )


def model_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint folder as saved (dtypes), whole and on the CPU, from
    either format, keyed as GPT.state_dict() (the tied lm_head.weight, which format 2 stores
    once as transformer.wte.weight, is the same tensor); after verify(path). Raises
    CheckpointError, UnsafeFileError."""
    path = Path(path)
    state = verify(path)
    if MODEL in state.get("files", {}):
        return load_file(path / MODEL)
    model = {k.removeprefix("model."): v for k, v in saved_state(path, "model.").items()}
    if TIED in model:
        model.setdefault(TIED_TO, model[TIED])
    return model


TIED, TIED_TO = "transformer.wte.weight", "lm_head.weight"
"""GPT-2's tied embedding: lm_head.weight is transformer.wte.weight (pipeline.model)."""


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
        raise CheckpointError(
            f"{ckpt / STATE} records no model this pipeline can build ({type(e).__name__}: {e})"
        ) from None
    load_checkpoint(ckpt, model, restore_rng=False)
    return model.eval(), ckpt, state
