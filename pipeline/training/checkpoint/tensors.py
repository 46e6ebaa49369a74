"""The tensors of a checkpoint (format 2) through torch.distributed.checkpoint (DCP), as
torchtitan writes them: every process writes its own part of the model and optimizer states, in
parallel, into `__<rank>_<n>.distcp` files, and the coordinator an index of them (`.metadata`);
on resume every process reads only the slices it holds, whatever the number of processes that
wrote them (DCP reshards: FSDP or not, 1 or N processes, a ZeroRedundancyOptimizer's matrices
on whichever rank owns them now).

What each process contributes (`tensor_state`), flattened by DCP into dotted keys:
  model      get_model_state_dict: FSDP's DTensor shards, or the replicated tensors (DCP keeps
             one copy)
  optimizer  get_optimizer_state_dict of the optimizers that are not sharded (AdamW; Muon on
             one process): states keyed by parameter name, and the param_groups
  zero       a ZeroRedundancyOptimizer's (Muon on several processes): the states of this
             rank's own matrices only, keyed by parameter name, and the whole param_groups

Reading is as safe as safe_load.load_file: DCP's reader unpickles `.metadata` with plain pickle
and its planner loads non-tensor values with torch.load(weights_only=False); SafeReader and
SafePlanner use torch's weights-only unpickler for both, so a checkpoint from elsewhere cannot
run code (UnsafeFileError).
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import pickle
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.errors import CheckpointError
from pipeline.training.checkpoint.safe_load import UNSAFE_THEN, load_file, refusal
from pipeline.training.optim import is_sharded, load_sharded_named_state

MODEL, OPTIMIZER = "model.pt", "optimizer.pt"
"""The whole model's and optimizers' states of a format-1 checkpoint (load_format_1)."""
METADATA = ".metadata"
"""DCP's index of a checkpoint's tensors: which file and offset holds each slice."""
TENSOR_FILE_SUFFIX = ".distcp"

Optimizer = torch.optim.Optimizer | list[torch.optim.Optimizer]


def _optimizers(optimizer: Optimizer | None) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return optimizer if isinstance(optimizer, list) else [optimizer]


def tensor_state(model: torch.nn.Module, optimizer: Optimizer | None) -> dict:
    """This process's part of the checkpoint, as DCP saves it (see the module docstring). Not
    collective, and no copy: the tensors are the live ones (stage them before changing them)."""
    out: dict[str, Any] = {"model": _model_state(model)}
    optimizers = _optimizers(optimizer)
    if optimizers:
        plain = [opt for opt in optimizers if not is_sharded(opt)]
        named = get_optimizer_state_dict(model, plain) if plain else _EMPTY
        zero = _zero_state(model, [opt for opt in optimizers if is_sharded(opt)])
        groups = zero["param_groups"] + named["param_groups"]  # Muon's first, as built
        out["optimizer"] = {"state": {**zero["state"], **named["state"]}, "param_groups": groups}
    return out


_EMPTY = {"state": {}, "param_groups": []}


def _model_state(model: torch.nn.Module) -> dict:
    """get_model_state_dict without the second name of a tied parameter (GPT-2's lm_head.weight
    is transformer.wte.weight): DCP would store it twice."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


def _zero_state(model: torch.nn.Module, optimizers: list) -> dict:
    """The ZeroRedundancyOptimizers' states of this rank's parameters, keyed by parameter name,
    and their whole param_groups (names of every rank's parameters): the layout of
    get_optimizer_state_dict, as torch.optim.Muon on one process gives it."""
    names = {p: n for n, p in model.named_parameters()}
    state, groups = {}, []
    for opt in optimizers:
        zero = getattr(opt, "optimizer", opt)
        for p, s in zero.optim.state.items():
            state[names[p]] = dict(s)
        for group in zero.param_groups:
            groups.append({**group, "params": [names[p] for p in group["params"]]})
    return {"state": state, "param_groups": groups}


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by torch's weights-only unpickler (DCP's own
    metadata classes allowed, nothing else). Raises UnsafeFileError for an index that would
    call anything else."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self.path) / METADATA
        with open(path, "rb") as f:
            metadata = read_metadata_safely(f, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if metadata.planner_data is None:
            metadata.planner_data = {}
        return metadata


METADATA_CLASSES = {
    (cls.__module__, cls.__qualname__): cls
    for cls in (
        dcp_metadata.Metadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata._MEM_FORMAT_ENCODING,
        torch.Size,
        torch.distributed.checkpoint.filesystem._StorageInfo,
        pathlib.PosixPath,
        pathlib.PurePosixPath,  # StorageMeta.checkpoint_id: the folder
    )
}
"""The classes a DCP index holds (torch 2.13), the only ones its unpickling may build, besides
torch's dtypes and layouts (`torch.float32`; `torch.strided` through its lookup by name,
torch.serialization._get_layout)."""


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's index: find_class gives METADATA_CLASSES, torch's dtypes and layouts,
    and refuses every other global (the restricted unpickler of Python's pickle docs), so
    unpickling can build only the index and call nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_CLASSES:
            return METADATA_CLASSES[module, name]
        if (module, name) == ("torch.serialization", "_get_layout"):  # a lookup by name
            return torch.serialization._get_layout
        found = getattr(torch, name, None) if module == "torch" else None
        if isinstance(found, (torch.dtype, torch.layout)):
            return found
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata_safely(
    f: io.BufferedIOBase, path: Path, then: str = UNSAFE_THEN
) -> dcp_metadata.Metadata:
    """Unpickle a DCP index with _IndexUnpickler. Raises UnsafeFileError (with `then`, what to
    do, as safe_load.refusal) for one that names anything else, CheckpointError for one that
    cannot be read."""
    try:
        metadata = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise refusal(path, f"unpickling it would call {e}, which can run any code", then) from None
    except Exception as e:  # noqa: BLE001 - a truncated or damaged index
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}); delete "
            f"{path.parent} to resume from the checkpoint before it"
        ) from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} is not a checkpoint index: delete {path.parent}")
    return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (param_groups) read weights-only: a value that
    would call anything raises UnsafeFileError naming the checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            why = f"unpickling its value {fqn} would call more than numbers and strings ({e})"
            raise refusal(
                self.folder / f"__*{TENSOR_FILE_SUFFIX}", " ".join(why.split())[:300]
            ) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner: into the caller's nested dict
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _one_process_is_intended() -> None:
    """Silence DCP's warning that one process without torch.distributed saves or loads alone
    (evaluation, exports, a one-process run): that is what this module means then."""
    warnings.filterwarnings(
        "ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning
    )


def read_tensor_state(folder: Path, target: dict, process_group=None) -> dict:
    """Fill `target` (a tensor_state-shaped dict of this process's tensors: DTensor shards read
    only their slices) from the checkpoint in folder. Collective when torch.distributed is
    initialized (every process calls it); one process reads alone otherwise. Raises
    UnsafeFileError, and DCP's errors (CheckpointException, RuntimeError) for missing keys or
    shapes."""
    _one_process_is_intended()
    dcp.load(
        target,
        storage_reader=SafeReader(folder),
        planner=SafePlanner(folder),
        process_group=process_group,
    )
    return target


def saved_state(folder: Path, prefix: str = "") -> dict[str, Any]:
    """The entries of the checkpoint in folder whose flattened keys (`model.<name>`,
    `optimizer.state.<name>.<key>`, `optimizer.param_groups`) start with prefix, as saved:
    tensors whole, on the CPU, in their saved dtype, and values. One process reads them all
    (collective under torch.distributed). Raises as read_tensor_state."""
    target: dict[str, Any] = {}
    for key, meta in SafeReader(folder).read_metadata().state_dict_metadata.items():
        if key.startswith(prefix):
            tensor = isinstance(meta, dcp_metadata.TensorStorageMetadata)
            target[key] = torch.empty(meta.size, dtype=meta.properties.dtype) if tensor else None
    return read_tensor_state(folder, target)


def load_tensor_state(folder: Path, model: torch.nn.Module, optimizer: Optimizer | None) -> None:
    """Load the model's (and the optimizers') states from the checkpoint in folder into the
    unwrapped model, sharded with FSDP or not, and its optimizers: each process reads only what
    it holds. Collective under torch.distributed. Raises as read_tensor_state."""
    target = tensor_state(model, None)
    optimizers = _optimizers(optimizer)
    if optimizers:
        plain = [opt for opt in optimizers if not is_sharded(opt)]
        named = get_optimizer_state_dict(model, plain) if plain else _EMPTY  # empty states
        sharded = [opt for opt in optimizers if is_sharded(opt)]
        groups = _zero_state(model, sharded)["param_groups"] + named["param_groups"]  # as saved
        zero = _zero_target(folder, model, sharded)
        target["optimizer"] = {"state": {**zero, **named["state"]}, "param_groups": groups}
    read_tensor_state(folder, target)
    set_model_state_dict(model, target["model"], options=StateDictOptions(strict=False))
    # (not strict: a tied parameter's second name is not saved; DCP has checked every key)
    if optimizers:
        load_named_optimizer_state(model, optimizers, target["optimizer"], StateDictOptions())


def _zero_target(folder: Path, model: torch.nn.Module, optimizers: list) -> dict:
    """Where this rank's ZeroRedundancyOptimizer states load to: for each parameter it owns,
    the state tensors the checkpoint's index lists under its name (shape and dtype from the
    index)."""
    if not optimizers:
        return {}
    names = {p: n for n, p in model.named_parameters()}
    local = [getattr(opt, "optimizer", opt).optim for opt in optimizers]  # this rank's part
    mine = {names[p] for opt in local for g in opt.param_groups for p in g["params"]}
    state: dict[str, dict] = {}
    for key, meta in SafeReader(folder).read_metadata().state_dict_metadata.items():
        name, _, entry = key.removeprefix("optimizer.state.").rpartition(".")
        if key.startswith("optimizer.state.") and name in mine:
            state.setdefault(name, {})[entry] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return state


class TensorSaver:
    """Saves tensor_state with DCP, synchronously or asynchronously (torchtitan's
    "async_with_pinned_mem" mode on CUDA): `save` returns once the states are staged (copied
    into host memory that is reused across saves), and the files are written in a background
    thread while training goes on; the collectives of that thread run on a gloo group of their
    own, apart from training's. One per run; close() at the end."""

    def __init__(self, asynchronous: bool, device: torch.device, timeout_s: float = 1800) -> None:
        _one_process_is_intended()
        self.asynchronous = asynchronous
        self.group = None
        if asynchronous and dist.is_initialized():  # collective: every process
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.stager = None
        if asynchronous:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = device.type == "cuda"
            self.stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=False,
                    use_async_staging=cuda,
                    use_non_blocking_copy=cuda,
                )
            )

    def save(self, state: dict, folder: Path) -> Future:
        """Write state into folder (every process its own part; collective): returns once the
        live tensors may change again, with a future that completes when every process's files
        and the index are written (at once when synchronous)."""
        writer = FileSystemWriter(folder, sync_files=True)
        if not self.asynchronous:
            dcp.save(state, storage_writer=writer)
            done: Future = Future()
            done.set_result(None)
            return done
        response = dcp.async_save(
            state, storage_writer=writer, process_group=self.group, async_stager=self.stager
        )
        if isinstance(response, Future):
            return response
        response.staging_completion.result()  # the live tensors may change from here on
        return response.upload_completion

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None


def tensor_files(folder: Path) -> list[str]:
    """The DCP files of a checkpoint folder, sorted: the index and every process's data."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name == METADATA or p.name.endswith(TENSOR_FILE_SUFFIX)
    )


def when_done(
    future: Future,
    then: Callable[[], None],
    failed: Callable[[BaseException], BaseException] = lambda e: e,
) -> Future:
    """A future of then() run after `future` completes (in the thread that completes it); an
    exception of either is handed on as failed(exception)."""
    out: Future = Future()

    def chain(f: Future) -> None:
        try:
            f.result()
            then()
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on `out`
            out.set_exception(failed(e))
        else:
            out.set_result(None)

    future.add_done_callback(chain)
    return out


def load_format_1(path: Path, model: torch.nn.Module, optimizer: Optimizer | None) -> None:
    """Load the tensors of a format-1 checkpoint (model.pt, optimizer.pt: whole states keyed by
    parameter name, read weights-only) into the model and optimizers, sharded or not: every
    process reads all of it. Raises UnsafeFileError, CheckpointError, RuntimeError (shapes)."""
    load = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(path / MODEL), options=load)
    if optimizer is not None:
        load_named_optimizer_state(model, optimizer, load_file(path / OPTIMIZER), load)


def load_named_optimizer_state(
    model: torch.nn.Module, optimizer: Optimizer, named: dict, options: StateDictOptions
) -> None:
    """Load an optimizer state keyed by parameter name (format 1's whole one, or what
    load_tensor_state read) into the run's optimizers: each rank's part into a
    ZeroRedundancyOptimizer, the rest through set_optimizer_state_dict."""
    optimizers = _optimizers(optimizer)
    for opt in optimizers:
        if is_sharded(opt):
            named = load_sharded_named_state(model, getattr(opt, "optimizer", opt), named)
    plain = [opt for opt in optimizers if not is_sharded(opt)]
    if plain:
        set_optimizer_state_dict(model, plain, named, options=options)


def weights_sha256(state: dict) -> str | None:
    """A fingerprint of a checkpoint's tensors from its state.json (no file is read): model.pt's
    sha256 (format 1), or the sha256 of the DCP files' names and sha256s (format 2, which hold
    the optimizers' states too). None when state.json records no files. Two checkpoints with
    the same fingerprint hold the same weights (the converse need not hold)."""
    files = state.get("files", {})
    if MODEL in files:
        return files[MODEL]["sha256"]
    tensors = sorted(
        f"{name} {meta['sha256']}\n"
        for name, meta in files.items()
        if name == METADATA or name.endswith(TENSOR_FILE_SUFFIX)
    )
    return hashlib.sha256("".join(tensors).encode()).hexdigest() if tensors else None
