"""Writing files so that a reader never sees half of one: the project's one atomic writer.

Every file the project writes (shards, manifests, checkpoints, exports, evaluation results,
caches) goes through `atomic_path` or `atomic_dir`: written under a temporary name in the same
folder, fsynced, renamed into place, the rename made durable by fsyncing the folder. On any
failure (a full disk, Ctrl-C, torch's zip writer raising RuntimeError) the temporary file or
folder is removed and the error raised, so the target is whole or absent and what was there
before is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a file to dest atomically (see atomic_path)."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


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
