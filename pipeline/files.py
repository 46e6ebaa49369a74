"""Writing files so that a reader never sees half of one: the project's one atomic writer.

Every file the project writes (shards, manifests, checkpoints, exports, evaluation results,
caches) goes through `atomic_path` or `atomic_dir`: written under a temporary name in the same
folder, fsynced, renamed into place, the rename made durable by fsyncing the folder. On any
failure (a full disk, Ctrl-C, torch's zip writer raising RuntimeError) the temporary file or
folder is removed and the error raised, so the target is whole or absent and what was there
before is untouched.

Folders a process writes into for a long time (a run folder, a prepare output) are held with
`folder_lock`, so a second process refuses to start instead of interleaving its files; and
`write_failed` turns a failed write into one line saying what is intact and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import FolderLockedError, OutputError

LOCK = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DEAD_HOLDER_WAIT_S = 5.0
"""How long a lock is waited for when its holder has ended on this host (forked workers of a
killed process still hold it until they notice, within about a second)."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under a folder, then each folder (deepest first)."""
    folders = []
    for root, _, names in os.walk(path):
        folders.append(root)
        for name in names:
            fsync_file(os.path.join(root, name))
    for folder in reversed(folders):
        fsync_dir(folder)


def temporary_name(path: str | os.PathLike) -> Path:
    """`<path>.tmp`: where `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write the file there. On a clean exit it is
    fsynced and renamed to `path`; on any exception it is removed and the exception raised."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder (`tmp`, default `<path>.tmp`, emptied first); fill it.
    On a clean exit every file in it is fsynced and it replaces `path` (an existing `path` is
    removed first); on any exception it is removed and the exception raised."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write data at path atomically: path is whole or absent (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text at path atomically (see atomic_path)."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write obj as indented JSON at path atomically (see atomic_path)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_plain_name(name: str) -> bool:
    """Whether name is a single path component (no '/', not '.' or '..', not empty)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def make_folder(path: str | os.PathLike, what: str, instead: str) -> Path:
    """Create folder `path` (and its parents) if missing; returns it. Raises OutputError naming
    `what` when it cannot be: a file stands where a folder must be, or no permission."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise OutputError(
                f"{what} {path} cannot be created: {blocker} is a file, not a folder: move or "
                f"delete it, or choose another {instead}"
            ) from e
        raise OutputError(
            f"{what} {path} cannot be created ({e.strerror or e}): fix the path or its "
            f"permissions, or choose another {instead}"
        ) from e
    return path


def _holder(lock: Path) -> tuple[str, int | None, str]:
    """(description, pid, host) of the process a lock file names."""
    try:
        fields = dict(f.split("=", 1) for f in lock.read_text().split() if "=" in f)
        pid, host = int(fields["pid"]), fields["host"]
    except (OSError, ValueError, KeyError):
        return "another process", None, ""
    return f"process {pid} on {host}", pid, host


def _ended(pid: int | None, host: str) -> bool:
    """Whether the process `pid` of this host has ended (False when unknown or elsewhere)."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _try_lock(lock: Path) -> int | None:
    """An open descriptor of `lock` holding its exclusive flock, or None when another process
    holds it. Retries when the file was replaced between open and flock (a holder removing it
    as it releases), so two processes never hold locks on different files of one name."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # a holder that had created the folder removed it, empty
            lock.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str, instead: str) -> Iterator[Path]:
    """Hold folder `path` (created, see make_folder) for this process while the block runs.

    The lock is an exclusive `flock` on `<path>/.lock`, which names the holder (pid, host): the
    operating system releases it when the holder ends however it ends, so a lock left by a
    killed process never blocks a restart. Released (and the file removed) on leaving the
    block, also on an exception; a folder it created is removed again when nothing else was
    written into it. Raises FolderLockedError naming `what`, the folder and the
    process holding it, and the way out (`instead`: another what to choose), or OutputError
    when the folder cannot be created."""
    created = not Path(path).is_dir()
    path = make_folder(path, what, instead)
    lock = path / LOCK
    deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
    while (fd := _try_lock(lock)) is None:
        holder, pid, host = _holder(lock)
        if not _ended(pid, host) or time.monotonic() > deadline:
            raise FolderLockedError(
                f"{what} {path} is in use by {holder} (it holds {lock}): wait for that process "
                f"to finish or stop it, then run the same command again; or choose another "
                f"{instead}"
            )
        time.sleep(0.1)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: a waiting process then retries on a new file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: what was written stays


def write_failed(path: str | os.PathLike, error: BaseException, then: str) -> OutputError:
    """The one-line error of writing `path` that failed with `error`: an OSError (ENOSPC on a
    full disk), torch's zip writer's RuntimeError ("unexpected pos ...", its way of failing on a
    full disk) or safetensors' error. `then`: what is intact and what to do."""
    text = " ".join(str(error).split())
    code = getattr(error, "errno", None)
    if code in DISK_FULL or "unexpected pos" in text or "No space left" in text:
        cause = f"the disk is full ({getattr(error, 'strerror', None) or text})"
    else:
        cause = getattr(error, "strerror", None) or f"{type(error).__name__}: {text}"
    return OutputError(f"writing {path} failed: {cause}; {then}")
