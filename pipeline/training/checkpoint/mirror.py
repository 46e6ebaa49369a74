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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from pipeline.errors import CheckpointError, UnsafeFileError
from pipeline.files import fsync_dir
from pipeline.training.checkpoint.folder import (
    STATE,
    STEP_DIR,
    check_loads_safely,
    checkpoint_dir,
    keep_by_rotation,
    list_checkpoints,
    read_state,
    state_problem,
    verify_checksums,
)
from pipeline.training.faults import inject

DOWNLOAD_DIR = ".mirror_download"
"""Staging folder of a pull, inside `<run>/checkpoints/` (not a `step_*` name)."""


def checkpoint_files(state: dict) -> list[str]:
    """Files of a checkpoint in upload order: those state.json records, then state.json last
    (its presence marks a complete checkpoint)."""
    return [*sorted(state.get("files", {})), STATE]


def install_checkpoint(
    staged: str | os.PathLike,
    final: str | os.PathLike,
    step: int,
    unsafe_then: str,
    replace: bool = False,
) -> None:
    """Move a downloaded checkpoint folder to `final` (`runs/<run>/checkpoints/step_N`) after
    read_state and its checksums accept it, its step is `step` and no file names code to run
    when loaded (check_loads_safely; `unsafe_then`: what the refusal tells the user to do, the
    download being deleted); `final` appears complete or not at all. replace: a folder already
    at `final` (a damaged one) is deleted once the download has passed. Raises CheckpointError
    for an incomplete or damaged download or another step, UnsafeFileError for such a file."""
    staged, final = Path(staged), Path(final)
    try:
        state = read_state(staged)
        verify_checksums(staged, state)
        check_loads_safely(staged, unsafe_then)
    except UnsafeFileError:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if state.get("step") != step:
        raise CheckpointError(
            f"{staged}: state.json says step {state.get('step')}, expected {step}"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace and final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(final.parent)


class Mirror:
    """The mirror of one run's checkpoints (see the module docstring); main process only."""

    def __init__(
        self, url: str, run_dir: Path, run_name: str, keep_last: int, say: Callable[[str], None]
    ):
        """url: checkpoint.mirror; run_dir: the run's folder; run_name: trainer.run_name (a
        sweep's job `<sweep>/<N>`), its folder in the mirror; say: prints a line."""
        self.url, self.run_dir, self.keep_last, self.say = url, Path(run_dir), keep_last, say
        self.fs, root = fsspec.core.url_to_fs(url)  # checked by CheckpointConfig.problems
        root = root.rstrip("/")
        self.folder = f"{root}/checkpoints/{run_name.strip('/')}"
        self.where = f"{url.rstrip('/')}/checkpoints/{run_name.strip('/')}"
        self._cond = threading.Condition()
        self._pending = self._busy = self._closing = False
        self._thread: threading.Thread | None = None

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
            if state_problem(state) is None and state.get("step") == int(match.group(1)):
                found[state["step"]] = state  # its files plain names: nothing lands elsewhere
        return found

    def _local(self) -> dict[int, tuple[Path, dict]]:
        """The run's complete local checkpoints: {step: (folder, state.json)}; a damaged one,
        or one rotated away meanwhile, is left out."""
        local = {}
        for path in list_checkpoints(self.run_dir):
            try:
                state = read_state(path)
                local[state["step"]] = (path, state)
            except (CheckpointError, KeyError):
                continue
        return local

    def _step_folder(self, step: int) -> str:
        return f"{self.folder}/{checkpoint_dir(Path(), step).name}"  # .../step_NNNNNNN

    # ------------------------------------------------------------------------------ upload

    def submit(self) -> None:
        """Bring the mirror up to date with the run's complete checkpoints in the background
        (sync); returns at once. One update runs at a time; submits during it make one more."""
        with self._cond:
            self._pending = True
            self._cond.notify_all()
            if self._thread is None:  # a daemon: a process past close() does not wait for it
                self._thread = threading.Thread(
                    target=self._work, name="checkpoint-mirror", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                self._pending, self._busy = False, True
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - a failed upload never stops training
                self.say(
                    f"warning: mirroring checkpoints to {self.where} failed "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); the next "
                    "checkpoint tries again"
                )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def sync(self) -> list[int]:
        """Upload the kept local checkpoints the mirror lacks (newest first), then delete the
        mirrored ones rotation drops, counting only what is mirrored now (a checkpoint rotated
        away locally before its upload never costs the mirror its predecessor), and partial
        uploads. Returns the steps uploaded. Raises the file system's errors."""
        local = self._local()
        remote = self.remote()
        keep = keep_by_rotation(
            {**{s: st for s, (_, st) in local.items()}, **remote}, self.keep_last
        )
        uploaded = {}
        for step in sorted(keep - remote.keys(), reverse=True):
            if self._upload(local[step][0]):
                uploaded[step] = local[step][1]
        mirrored = {**remote, **uploaded}
        self._delete(mirrored.keys() - keep_by_rotation(mirrored, self.keep_last), partial=True)
        return sorted(uploaded)

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
        """Let the update in flight (and one asked for meanwhile) finish, for at most timeout_s
        seconds (the end of a run, a preemption); past it a warning says so and this returns:
        the process may exit, the upload thread being a daemon, and a partial upload stays
        invisible."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.say(
                        f"warning: the checkpoint upload to {self.where} did not finish "
                        f"within checkpoint.mirror_timeout_s={timeout_s:g}; the local "
                        "checkpoints are complete, and the next start of the run "
                        "uploads what the mirror lacks"
                    )
                    return
                self._cond.wait(left)

    # ------------------------------------------------------------------------------ pull

    def pull(self) -> Path | None:
        """Download the newest complete mirrored checkpoint if it is newer than every complete
        local one, check it and install it in the run's checkpoints folder; returns its folder,
        or None when the local checkpoints are as new. A mirrored checkpoint that fails its
        checks is reported and the one before it tried. Raises CheckpointError when the mirror
        cannot be read, UnsafeFileError for a file that would run code."""
        local = self._local()
        try:
            remote = retried(self.remote)
        except Exception as e:  # noqa: BLE001 - every file system raises its own
            raise CheckpointError(
                f"cannot read the checkpoint mirror {self.where} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}): check the URL and its credentials, or run "
                "without checkpoint.mirror to continue from the local checkpoints only"
            ) from None
        newest_local = max(local, default=-1)
        staging = self.run_dir / "checkpoints" / DOWNLOAD_DIR
        try:
            for step in sorted((s for s in remote if s > newest_local), reverse=True):
                try:
                    return self._download(step, remote[step], staging)
                except CheckpointError as e:
                    self.say(
                        f"warning: not pulling {self._step_folder(step)} ({e}); remove it "
                        "from the mirror. Trying the one before it"
                    )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return None

    def _download(self, step: int, state: dict, staging: Path) -> Path:
        shutil.rmtree(staging, ignore_errors=True)
        staged = staging / checkpoint_dir(Path(), step).name
        staged.mkdir(parents=True)
        source = self._step_folder(step)
        try:
            for name in checkpoint_files(state):
                retried(lambda n=name: self.fs.get_file(f"{source}/{n}", str(staged / n)))
        except Exception as e:  # noqa: BLE001 - every file system raises its own
            raise CheckpointError(
                f"its download failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from None
        final = checkpoint_dir(self.run_dir, step)  # a damaged local copy is replaced
        install_checkpoint(
            staged,
            final,
            step,
            f"it was not installed and the download was deleted: remove {source} from the mirror",
            replace=True,
        )
        self.say(f"pulled checkpoint {self.where}/{final.name} -> {final}")
        return final


RETRIES = (2.0, 8.0)
"""Seconds before the second and third try of a read from the mirror (a transient error)."""


def retried(read: Callable[[], Any]) -> Any:
    """read(), tried again after each pause of RETRIES when it raises; the last error is
    raised. For reads only: they change nothing when repeated."""
    for pause in RETRIES:
        try:
            return read()
        except (FileNotFoundError, PermissionError):
            raise  # not transient
        except Exception:  # noqa: BLE001 - every file system raises its own
            time.sleep(pause)
    return read()
