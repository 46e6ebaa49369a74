"""Checkpoints mirrored off the machine (`checkpoint.mirror=URL`), and pulled back on a new one.

URL is an fsspec URL: a local or network folder (a path, or file://), `s3://bucket/prefix`
(s3fs), `gs://bucket/prefix` (gcsfs) or `hf://<repo type>s/<repo_id>` (huggingface_hub's own
fsspec file system, HfFileSystem). A run's checkpoints go to
`<URL>/checkpoints/<run_name>/step_NNNNNNN/`, the layout `make push-checkpoint` gives a hub
repo: the files state.json lists, then state.json itself. A mirrored checkpoint is complete
when its state.json is there and parses: a partial upload (a killed process, a lost machine)
has none, is never pulled, and the next upload deletes it.

The main process's Checkpointer hands every complete checkpoint to Mirror.submit, which returns
at once; one background thread makes the mirror hold what rotation keeps (the newest keep_last,
the best validation loss, the newest extendable; rotate's rule, over the local and mirrored
checkpoints together), uploading what is missing, newest first, and deleting the rest
(state.json first, so a half-deleted checkpoint is invisible too). A failure is one warning
line, and the next checkpoint's upload tries again. On resume (`checkpoint.resume=auto` or
`latest`) a mirrored checkpoint newer than every local one is downloaded, checked (sizes,
sha256, the safety scan) and installed where the run's own checkpoints are, before the run
chooses the one it continues from.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import fsspec

from pipeline.errors import CheckpointError, UnsafeFileError
from pipeline.files import fsync_dir
from pipeline.training.checkpoint import (
    STATE,
    STEP_DIR,
    check_loads_safely,
    checkpoint_dir,
    keep_by_rotation,
    list_checkpoints,
    read_state,
    verify_checksums,
)
from pipeline.training.faults import inject

DOWNLOAD_DIR = ".mirror_download"
"""Staging folder of a pull, inside `<run>/checkpoints/` (not a `step_*` name)."""


def checkpoint_files(state: dict) -> list[str]:
    """Files of a checkpoint in upload order: those state.json records, then state.json last
    (its presence marks a complete checkpoint)."""
    return [*sorted(state.get("files", {})), STATE]


def install_checkpoint(staged: str | os.PathLike, final: str | os.PathLike, step: int,
                       unsafe_then: str) -> None:  # fmt: skip
    """Move a downloaded checkpoint folder to `final` (`runs/<run>/checkpoints/step_N`) after
    read_state and its checksums accept it, its step is `step` and no file names code to run
    when loaded (check_loads_safely; `unsafe_then`: what the refusal tells the user to do, the
    download being deleted); `final` appears complete or not at all. Raises CheckpointError for
    an incomplete or damaged download or another step, UnsafeFileError for such a file."""
    staged, final = Path(staged), Path(final)
    try:
        state = read_state(staged)
        verify_checksums(staged, state)
        check_loads_safely(staged, unsafe_then)
    except UnsafeFileError:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if state.get("step") != step:
        raise CheckpointError(f"{staged}: state.json says step {state.get('step')}, expected "
                              f"{step}")  # fmt: skip
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    fsync_dir(final.parent)


class Mirror:
    """The mirror of one run's checkpoints (see the module docstring); main process only."""

    def __init__(self, url: str, run_dir: Path, keep_last: int, say: Callable[[str], None]):
        self.url, self.run_dir, self.keep_last, self.say = url, Path(run_dir), keep_last, say
        self.fs, root = fsspec.core.url_to_fs(url)  # checked by CheckpointConfig.problems
        root = root.rstrip("/")
        self.folder = f"{root}/checkpoints/{self.run_dir.name}"
        self.where = f"{url.rstrip('/')}/checkpoints/{self.run_dir.name}"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-mirror")
        self._lock = threading.Lock()
        self._queued = False
        self._last: Future | None = None

    # ------------------------------------------------------------------ the mirror's contents

    def remote(self) -> dict[int, dict]:
        """The complete mirrored checkpoints: {step: state.json}. Raises the file system's
        errors (OSError and its own)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.folder):
            return {}
        found = {}
        for entry in self.fs.ls(self.folder, detail=False):
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if not match:
                continue
            try:
                state = json.loads(self.fs.cat_file(f"{entry.rstrip('/')}/{STATE}"))
            except (FileNotFoundError, ValueError):  # partial: no state.json, or a torn one
                continue
            if isinstance(state, dict) and state.get("step") == int(match.group(1)):
                found[state["step"]] = state
        return found

    def _step_folder(self, step: int) -> str:
        return f"{self.folder}/{checkpoint_dir(Path(), step).name}"

    # ------------------------------------------------------------------------------ upload

    def submit(self, checkpoint: Path) -> None:
        """Bring the mirror up to date with the run's checkpoints in the background (the newest,
        `checkpoint`, included); returns at once. At most one update runs and one waits."""
        del checkpoint  # the update mirrors every kept local checkpoint, this one among them
        with self._lock:
            if self._queued:
                return
            self._queued = True
            self._last = self._pool.submit(self._update)

    def _update(self) -> None:
        with self._lock:
            self._queued = False
        try:
            self.sync()
        except Exception as e:  # noqa: BLE001 - a failed upload never stops training
            self.say(f"warning: mirroring checkpoints to {self.where} failed "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the next "
                     "checkpoint tries again")  # fmt: skip

    def sync(self) -> list[int]:
        """Upload the kept local checkpoints the mirror lacks (newest first) and delete the
        mirrored ones rotation drops and partial uploads. Returns the steps uploaded. Raises the
        file system's errors."""
        local = {}
        for path in list_checkpoints(self.run_dir):
            try:
                local[read_state(path)["step"]] = path
            except (CheckpointError, KeyError):
                continue  # damaged or rotated away meanwhile: not mirrored
        remote = self.remote()
        states = {**remote, **{s: json.loads((p / STATE).read_text()) for s, p in local.items()
                               if s not in remote}}  # fmt: skip
        keep = keep_by_rotation(states, self.keep_last)
        uploaded = []
        for step in sorted(keep - remote.keys(), reverse=True):
            if self._upload(local[step]):
                uploaded.append(step)
        self._delete(remote.keys() - keep, partial=True)
        return uploaded

    def _upload(self, path: Path) -> bool:
        """Copy one checkpoint folder, state.json last. False when it was rotated away locally
        before it was copied (a newer one exists)."""
        try:
            state = read_state(path)
        except CheckpointError:
            return False
        dest = self._step_folder(state["step"])
        if self.fs.exists(dest):  # a partial upload of the same step
            self.fs.rm(dest, recursive=True)
        self.fs.makedirs(dest, exist_ok=True)
        for i, name in enumerate(checkpoint_files(state)):
            if i == 1:
                inject("mirror", state["step"])
                inject("mirror_stall", state["step"])
            try:
                self.fs.put_file(str(path / name), f"{dest}/{name}")
            except FileNotFoundError:
                if not path.exists():
                    self.fs.rm(dest, recursive=True)
                    return False
                raise
        return True

    def _delete(self, steps: set[int], partial: bool) -> None:
        """Delete mirrored checkpoints (state.json first: invisible from then on) and, with
        partial, every step folder without a complete state.json."""
        for step in sorted(steps):
            folder = self._step_folder(step)
            self.fs.rm(f"{folder}/{STATE}")
            self.fs.rm(folder, recursive=True)
        if not partial or not self.fs.exists(self.folder):
            return
        complete = {self._step_folder(s) for s in self.remote()}
        for entry in self.fs.ls(self.folder, detail=False):
            entry = entry.rstrip("/")
            if STEP_DIR.match(entry.rsplit("/", 1)[-1]) and entry not in complete:
                self.fs.rm(entry, recursive=True)

    def close(self, timeout_s: float) -> None:
        """Let the update in flight finish, for at most timeout_s seconds (the end of a run, a
        preemption): a warning says when it did not, and the process may exit (a partial
        upload stays invisible)."""
        last = self._last
        try:
            if last is not None:
                last.result(timeout=timeout_s)
        except FutureTimeout:
            self.say(f"warning: the checkpoint upload to {self.where} did not finish within "
                     f"checkpoint.mirror_timeout_s={timeout_s:g}; the local checkpoints are "
                     "complete, and the next run's first checkpoint uploads again")  # fmt: skip
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ pull

    def pull(self) -> Path | None:
        """Download the newest complete mirrored checkpoint if it is newer than every complete
        local one, check it and install it in the run's checkpoints folder; returns its folder,
        or None when the local checkpoints are as new. A mirrored checkpoint that fails its
        checks is reported and the one before it tried. Raises CheckpointError when the mirror
        cannot be read, UnsafeFileError for a file that would run code."""
        local = []
        for path in list_checkpoints(self.run_dir):
            try:
                local.append(read_state(path)["step"])
            except (CheckpointError, KeyError):
                continue
        try:
            remote = self.remote()
        except Exception as e:  # noqa: BLE001 - every file system raises its own
            raise CheckpointError(
                f"cannot read the checkpoint mirror {self.where} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}): check the URL and its credentials, or run "
                "without checkpoint.mirror to continue from the local checkpoints only"
            ) from None
        newest_local = max(local, default=-1)
        for step in sorted((s for s in remote if s > newest_local), reverse=True):
            try:
                return self._download(step, remote[step])
            except CheckpointError as e:
                self.say(f"warning: not pulling mirrored step {step}: {e}")
        return None

    def _download(self, step: int, state: dict) -> Path:
        staging = self.run_dir / "checkpoints" / DOWNLOAD_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staged = staging / checkpoint_dir(Path(), step).name
        staged.mkdir(parents=True)
        source = self._step_folder(step)
        try:
            for name in checkpoint_files(state):
                self.fs.get_file(f"{source}/{name}", str(staged / name))
        except Exception as e:  # noqa: BLE001 - every file system raises its own
            raise CheckpointError(f"its download failed ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]})") from None  # fmt: skip
        final = checkpoint_dir(self.run_dir, step)
        install_checkpoint(staged, final, step, "it was not installed and the download was "
                           f"deleted: remove {source} from the mirror")  # fmt: skip
        shutil.rmtree(staging, ignore_errors=True)
        self.say(f"pulled checkpoint {self.where}/{final.name} -> {final}")
        return final
