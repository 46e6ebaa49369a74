"""The checkpointer of a run (Checkpointer): when to save, what a checkpoint of the run holds,
and where a run continues from. The folder format is folder.py's."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from pipeline.config import CheckpointConfig
from pipeline.data.loader import TrainLoader
from pipeline.errors import CheckpointError, ConfigError, UnsafeFileError, one_line, raise_if
from pipeline.model import GPT
from pipeline.training.checkpoint.folder import (
    list_checkpoints,
    load_checkpoint,
    newest_good,
    read_state,
    remove_unfinished,
    resolve_checkpoint,
    save_checkpoint,
    verify,
)
from pipeline.training.checkpoint.mirror import Mirror, retried
from pipeline.training.checkpoint.tensors import TensorSaver
from pipeline.training.optim import Optimizers
from pipeline.training.reporter import RunState, every
from pipeline.training.rng import rng_state

T = TypeVar("T")

Check = Callable[[dict], str | None]
"""Why a checkpoint (its state.json) cannot continue this run, or None when it can
(pipeline.training.optim.continuation_problem for the run's config)."""


def where() -> str:
    """This process, for a message read on another machine: node (torchrun's GROUP_RANK),
    host name and global rank."""
    return (
        f"node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()}, rank "
        f"{os.environ.get('RANK', '0')})"
    )


@dataclass
class Checkpointer:
    """Saves a run's checkpoints per its CheckpointConfig and restores the one it continues."""

    cfg: CheckpointConfig
    run_dir: Path
    max_steps: int
    last_stable_step: int | None
    """A WSD run's last step before its decay (checkpointed and kept, to extend the run from);
    None for a cosine schedule."""
    config: dict
    """The run's resolved TrainConfig, recorded in every checkpoint."""
    accelerator: Accelerator
    fsdp: bool
    """Each process holds a shard of the model (its weights differ from the others' by design)."""
    say: Callable[[str], None]
    """Prints a line on the main process (pipeline.training.reporter.main_print)."""
    timeout_s: float = 1800.0
    """runtime.dist_timeout_s: also the limit of the background save's collectives."""
    saver: TensorSaver | None = None
    """Writes the tensors (asynchronously per checkpoint.async_save); made at the first save."""
    in_flight: tuple[Path, Future] | None = None
    """The save not yet waited for: its folder and the future of its completion."""
    announced: bool = False
    """The save in flight was printed as saved (_announce)."""
    mirror: Mirror | None = None
    """The copy off the machine (checkpoint.mirror), on the main process; None without one."""

    def __post_init__(self) -> None:
        if self.cfg.mirror and self.accelerator.is_main_process:
            run_name = self.config.get("trainer", {}).get("run_name") or self.run_dir.name
            self.mirror = Mirror(
                self.cfg.mirror, self.run_dir, run_name, self.cfg.keep_last, self.say
            )

    def due(self, step: int) -> bool:
        """Whether to checkpoint after `step` steps: every checkpoint.interval, at the end and,
        for a WSD run, at its last stable step, from which the run can later be extended."""
        return every(step, self.cfg.interval, self.max_steps) or step == self.last_stable_step

    def restore(
        self, model: GPT, optimizer: Optimizers, loader: TrainLoader, check: Check
    ) -> tuple[Path | None, RunState]:
        """Remove checkpoint folders a killed process left half-written, then load the
        checkpoint the run continues from into model, optimizer, loader and the RNG states.
        Returns (its folder, its RunState), or (None, a fresh RunState) for a new run.

        checkpoint.resume: auto -> the newest checkpoint that loads and passes check (a
        truncated or corrupt one is reported and skipped; so is one that check refuses), a new
        run if there is none; with checkpoint.mirror, a mirrored checkpoint newer than every
        local one is pulled into the run folder first (mirror.py); latest -> the
        same, but one must exist; never -> a new run, refusing a run folder with checkpoints;
        else a checkpoint folder path. Raises CheckpointError (also when the loader's position
        belongs to other data, another seed or block_size), or ConfigError when the checkpoints
        cannot continue this run (check), or, before any tensor is loaded, when the checkpoint
        was trained with another model.*, block size or trainer.seed, or on other data (unless
        data.allow_other_data)."""
        if self.accelerator.is_main_process:
            remove_unfinished(self.run_dir)
        self.accelerator.wait_for_everyone()

        def fits(path: Path, saved: dict) -> str | None:
            raise_if(self.resume_problems(saved, loader.data, f"checkpoint {path}"))
            return check(saved)

        path, saved = self._load(model, optimizer, fits)
        state = RunState()
        if saved is not None:
            try:
                loader.load_state_dict(saved["loader"], other_data=self._allow_other_data)
            except (KeyError, TypeError) as e:  # a state.json without the loader's position
                raise CheckpointError(
                    f"{path / 'state.json'} records no loader position "
                    f"({type(e).__name__}: {e}): delete {path} to resume from "
                    "the checkpoint before it"
                ) from None
            except ValueError as e:  # other data, seed or block_size: the sample order differs
                raise CheckpointError(
                    f"{path}: {e}, or start a new run (another trainer.run_name)"
                ) from e
            state.load_state_dict(saved)
        return path, state

    @property
    def _allow_other_data(self) -> bool:
        return bool(self.config.get("data", {}).get("allow_other_data"))

    def resume_problems(self, saved: dict, data: dict, where: str) -> list[str]:
        """Why the checkpoint `where` (its state.json: `saved`) cannot continue this run, read from
        what it records before any tensor is loaded: another model.* value, block size or
        trainer.seed (each named with its old and new value), or other data (another manifest
        fingerprint; accepted with data.allow_other_data). [] when it fits; checkpoints that
        record none of it (older ones) fit."""
        old, new = saved.get("config") or {}, self.config
        changed = {  # key: (checkpoint's value, this run's)
            f"model.{key}": (old["model"][key], value)
            for key, value in new["model"].items()
            if key in old.get("model", {}) and old["model"][key] != value
        }
        if "model" in old:
            sizes = [
                c.get("data", {}).get("block_size") or c["model"]["block_size"] for c in (old, new)
            ]
            if sizes[0] != sizes[1] and "model.block_size" not in changed:
                changed["data.block_size"] = tuple(sizes)
        old_seed = old.get("trainer", {}).get("seed", new["trainer"]["seed"])
        if old_seed != new["trainer"]["seed"]:
            changed["trainer.seed"] = (old_seed, new["trainer"]["seed"])
        out = []
        if changed:
            was = ", ".join(f"{k}={a}" for k, (a, _) in changed.items())
            now = ", ".join(f"{k}={b}" for k, (_, b) in changed.items())
            out.append(
                f"{where} was trained with {was}; this launch sets {now}: resume with "
                f"{was}, or start a new run (another trainer.run_name)"
            )
        trained_on = saved.get("data") or {}
        fingerprint = trained_on.get("manifest_fingerprint")
        if fingerprint and fingerprint != data["manifest_fingerprint"]:
            if not self._allow_other_data:
                out.append(
                    f"{where} was trained on {trained_on['shard_dir']} (manifest fingerprint "
                    f"{fingerprint[:12]}), this launch reads {data['shard_dir']} (fingerprint "
                    f"{data['manifest_fingerprint'][:12]}): point data.shard_dir at the data "
                    "it was trained on, or set data.allow_other_data=true to continue on this "
                    "data"
                )
            else:
                self.say(
                    f"note: continuing on other data than {trained_on['shard_dir']} "
                    "(data.allow_other_data=true)"
                )
        return out

    def _load(
        self, model: GPT, optimizer: Optimizers, check: Callable[[Path, dict], str | None]
    ) -> tuple[Path | None, dict | None]:
        """Load per checkpoint.resume (see restore): (folder, state.json) or (None, None).

        On several processes every one loads the same checkpoint: the main process chooses it
        (in its run folder, the run's: it writes the checkpoints; or checkpoint.resume's
        folder), every other process checks that it reads the same one, and only then do all
        load it. A process that
        cannot read it (nodes that see different run folders) stops them all, with one line
        naming it, instead of resuming some and starting others at step 0 (which hangs them)."""
        resume, run_dir = self.cfg.resume, self.run_dir
        if resume == "never":
            self._from_main(functools.partial(self._refuse_checkpoints, run_dir))
            return None, None
        if resume in ("auto", "latest"):
            if self.cfg.mirror:  # a newer mirrored checkpoint first (a machine was lost)
                self._from_main(self._pull)
            name = self._from_main(functools.partial(self._choose, check))
            if name is None:
                return None, None
            path = run_dir / "checkpoints" / name
            self._everywhere(functools.partial(self._readable, path))
        else:  # resolved once: a run folder's newest checkpoint could differ between copies
            path = Path(self._from_main(functools.partial(self._explicit, resume, check)))
            self._everywhere(functools.partial(self._readable, path))
        saved = load_checkpoint(
            path, model, optimizer.raw, rank=self.accelerator.process_index, verified=True
        )
        return path, saved

    def _pull(self) -> None:
        """On the main process: install the mirror's newest checkpoint if it is newer than
        every local one (Mirror.pull), then upload in the background what the mirror lacks
        (a checkpoint whose upload an earlier start cut off)."""
        assert self.mirror is not None
        self.mirror.pull()
        self.mirror.submit()

    def _refuse_checkpoints(self, run_dir: Path) -> None:
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already has checkpoints and checkpoint.resume=never: use "
                "checkpoint.resume=auto to continue it, or another trainer.run_name"
            )
        if self.mirror is not None and retried(self.mirror.remote):
            raise CheckpointError(
                f"{self.mirror.where} already holds checkpoints of this run and "
                "checkpoint.resume=never: use checkpoint.resume=auto to continue it, or another "
                "trainer.run_name"
            )

    def _choose(self, check: Callable[[Path, dict], str | None]) -> str | None:
        """The name of the checkpoint to continue from (newest_good), None for a new run."""
        path = newest_good(self.run_dir, self.say, check)
        if path is None and self.cfg.resume == "latest":
            raise CheckpointError(
                f"checkpoint.resume=latest but {self.run_dir} has no complete checkpoint: check "
                "trainer.run_name and trainer.runs_dir, or start it with checkpoint.resume=auto"
            )
        return None if path is None else path.name

    def _readable(self, path: Path) -> None:
        """On a process other than the main one: the checkpoint the main process chose reads and
        verifies here too."""
        if self.accelerator.is_main_process:
            return  # newest_good verified it
        try:
            verify(path)
        except UnsafeFileError:
            raise  # altered, not missing: its own message says what to do
        except CheckpointError as e:
            raise CheckpointError(
                f"{where()} cannot read {path.parent.name}/{path.name}, the checkpoint the main "
                f"process resumes from ({e}): put trainer.runs_dir on storage every node reads "
                f"(a shared file system), or copy the run folder to every node at that path"
            ) from e

    def _explicit(self, resume: str, check: Callable[[Path, dict], str | None]) -> str:
        """checkpoint.resume=<folder>: the folder (as text, for the broadcast), checked against
        this run and verified."""
        path = resolve_checkpoint(resume)
        reason = check(path, read_state(path))
        if reason is not None:
            raise ConfigError([f"checkpoint.resume={resume}: {reason}"])
        verify(path)
        return str(path)

    def _from_main(self, fn: Callable[[], T]) -> T:
        """fn() on the main process, its result (picklable) given to every process; an error
        it raises is raised on every process (collective)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return fn()
        payload, error = [None, None], None
        if acc.is_main_process:
            try:
                payload = [fn(), None]
            except Exception as e:  # also a bug's: the others must not wait in the broadcast
                error, payload = e, [None, one_line(e)]
        broadcast_object_list(payload, from_process=0)
        if error is not None:
            raise error
        if payload[1] is not None:
            raise CheckpointError(f"{payload[1]} (found by the main process)")
        return payload[0]

    def _everywhere(self, fn: Callable[[], T]) -> T:
        """fn() on every process; an error raised on any of them is raised on all (the first
        one's line), so that none goes on to wait in a collective for one that stopped."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # also a bug's: the others must not wait in the gather
            error = e
        failed = [
            line
            for line in gather_object([None if error is None else one_line(error)])
            if line is not None
        ]
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(failed[0])
        return result

    def save(self, state: RunState, model: GPT, optimizer: Optimizers, loader: TrainLoader) -> Path:
        """Checkpoint the run at state.step (collective): every process writes its own tensors,
        in the background under checkpoint.async_save once they are staged, and the main
        process completes the folder. A save still in flight completes first (wait). Returns
        the checkpoint's folder (complete once wait() returns)."""
        acc = self.accelerator
        self.wait()
        if self.saver is None:  # collective (the background's own process group)
            self.saver = TensorSaver(self.cfg.async_save, acc.device, self.timeout_s)
        agree = self._replicas_agree(model)
        if agree is False:
            self.say("warning: model weights differ between processes")
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        meta = rng = None
        if acc.is_main_process:
            stable = self.last_stable_step is not None and state.step <= self.last_stable_step
            meta = {
                **state.state_dict(),
                "loader": loader.state_dict(),
                "data": loader.data,  # absolute shard folder, manifest fingerprint
                "config": self.config,
                "max_steps": self.max_steps,
                "extendable": stable,  # taken before a WSD run's decay
                "world_size": acc.num_processes,
                "replicas_agree": agree,
            }
            rng = {**rngs[0], "other_ranks": rngs[1:]}  # each rank's own dropout stream
        path, done = self._everywhere(
            functools.partial(
                save_checkpoint,
                self.run_dir,
                state.step,
                model,
                optimizer.raw,
                meta,
                self.cfg.keep_last,
                rng,
                self.saver,
            )
        )
        self.in_flight, self.announced = (path, done), False
        if not self.cfg.async_save:
            self.wait()
        return path

    def wait(self) -> Path | None:
        """Complete the save in flight, if any (collective): every process waits for its
        files, the main process for the whole folder; then the main process prints it. An
        error on any process is raised on every one (OutputError for a failed write).
        Returns the folder of the save it completed, or None."""
        if self.in_flight is None:
            return None
        (path, done), self.in_flight = self.in_flight, None
        self._everywhere(done.result)
        self._announce(path)
        return path

    def poll(self) -> None:
        """Print the save in flight once the main process has completed it (no waiting, no
        collective: wait() still checks every process)."""
        if self.in_flight is not None and self.in_flight[1].done():
            if self.in_flight[1].exception() is None:
                self._announce(self.in_flight[0])

    def _announce(self, path: Path) -> None:
        """Print the save in flight as saved, once."""
        if not self.announced:
            self.announced = True
            self.say(f"saved checkpoint {path}")
            if self.mirror is not None:
                self.mirror.submit()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind, error, trace) -> None:
        """Complete the save in flight when the run ends, stops or fails (a preempted run exits
        75 only once its checkpoint is complete), then release the background's resources.
        After another error the save's own error is reported as a warning, not raised."""
        try:
            if error is None:
                self.wait()
            elif self.in_flight is not None:
                try:
                    self.in_flight[1].result()
                    self._announce(self.in_flight[0])
                except BaseException as e:  # noqa: BLE001 - the run's own error goes on
                    self.say(f"warning: the checkpoint in flight was not written ({e})")
                self.in_flight = None
        finally:
            if self.saver is not None:
                self.saver.close()
            if self.mirror is not None:
                self.mirror.close(self.cfg.mirror_timeout_s)

    def _replicas_agree(self, model: GPT) -> bool | None:
        """Whether every process holds the same weights, as data parallelism promises: per
        tensor float64 sums, gathered from all ranks and compared exactly (collective). None
        under FSDP, where each process holds a different shard by design."""
        if self.fsdp:
            return None
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        gathered = self.accelerator.gather(sums).view(self.accelerator.num_processes, -1)
        return bool((gathered == gathered[0]).all())
