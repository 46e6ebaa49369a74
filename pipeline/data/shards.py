"""The shard format: llm.c-compatible uint16 token files plus a manifest; this module writes,
reads and verifies both.

A shard is a `.bin` file: a header of 256 little-endian int32 (`[0]` = 20240520 magic,
`[1]` = 1 version, `[2]` = number of tokens; llm.c `dev/data/data_common.py`), then that many
little-endian uint16 token ids. `manifest.json` beside the shards records the tokenizer, the
source, per-split document and token counts, and per shard its file name, split, token count and
sha256. The manifest is written last, so its presence means the folder is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.tokenizer import EOT, TOKENIZER, VOCAB_SIZE
from pipeline.errors import ShardError
from pipeline.files import is_plain_name, sha256_file, write_bytes_atomic, write_json_atomic

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("val", "train")


# --------------------------------------------------------------------------- shards


def shard_name(prefix: str, split: str, index: int) -> str:
    """File name of shard `index` (numbered across both splits, validation first)."""
    return f"{prefix}_{split}_{index:06d}.bin"


def header(num_tokens: int) -> bytes:
    """The 1,024-byte header of a shard holding num_tokens tokens."""
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1], h[2] = MAGIC, VERSION, num_tokens
    return h.tobytes()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write tokens (1-D, any integer dtype, every id < 65,536) as a shard at `path`.

    Written to `<path>.tmp`, fsynced, then renamed, so `path` exists only when complete.
    Returns the sha256 hex digest of the whole file. Raises ValueError for ids outside uint16;
    an OSError (e.g. a full disk) leaves no file at `path`.
    """
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise ValueError(
            f"token ids must fit uint16 (0..65535); got {tokens.min()}..{tokens.max()}"
        )
    data = header(len(tokens)) + tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_num_tokens(path: str | os.PathLike) -> int:
    """Token count from a shard's header, after checking magic, version and file size.

    Raises ShardError for a missing, truncated or foreign file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        h = np.frombuffer(head[: len(head) // 4 * 4], dtype="<i4")  # a short file: partial ints
    except FileNotFoundError:
        raise ShardError(f"{path}: shard is missing; run the prepare stage again") from None
    if h.size < HEADER_INTS or h[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (bad header magic); prepare the data again")
    if h[1] != VERSION:
        raise ShardError(f"{path}: shard version {h[1]}, this code reads version {VERSION}")
    expected = HEADER_BYTES + int(h[2]) * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: {size} bytes but its header promises {expected} (truncated or corrupt); "
            "delete the folder and prepare the data again"
        )
    return int(h[2])


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map a shard's tokens read-only: (num_tokens,) uint16. Raises ShardError."""
    n = read_num_tokens(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


# --------------------------------------------------------------------------- manifest


def build_manifest(
    settings: dict[str, Any], shards: list[dict[str, Any]], split_documents: dict[str, int]
) -> dict[str, Any]:
    """The manifest of a finished prepare run (deterministic: no times, no hosts).

    settings: "name", "source", "shard_size", "val_tokens" as the prepare stage records them;
    shards: {"file", "split", "tokens", "sha256"} per shard in order; split_documents: documents
    per split. Per-split token and shard counts are summed from shards.
    """
    splits = {
        split: {
            "documents": split_documents[split],
            "tokens": sum(s["tokens"] for s in shards if s["split"] == split),
            "shards": sum(s["split"] == split for s in shards),
        }
        for split in SPLITS
    }
    return {
        "format_version": MANIFEST_VERSION,
        "format": {
            "magic": MAGIC,
            "version": VERSION,
            "header": f"{HEADER_INTS} little-endian int32: magic, version, number of tokens",
            "tokens": "little-endian uint16, after the header",
        },
        "name": settings["name"],
        "tokenizer": TOKENIZER,
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT,
        "source": settings["source"],
        "shard_size": settings["shard_size"],
        "val_tokens": settings["val_tokens"],
        "splits": splits,
        "shards": shards,
    }


def write_manifest(shard_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write `<shard_dir>/manifest.json` atomically: after it, the folder is complete."""
    write_json_atomic(Path(shard_dir) / MANIFEST, manifest)


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """Read `<shard_dir>/manifest.json`. Raises ShardError when the folder or manifest is
    missing (prepare did not finish) or the manifest is not from this format."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise ShardError(
            f"shard folder {shard_dir} does not exist: run `python -m pipeline.prepare` "
            "(or `make prepare`) first, or point data.shard_dir at its output"
        )
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path} is missing: the prepare stage did not finish for {shard_dir}; "
            "run it again with the same settings and it continues where it stopped"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); prepare the data again") from None
    if manifest.get("format_version") != MANIFEST_VERSION or "shards" not in manifest:
        raise ShardError(f"{path}: unknown manifest format; prepare the data again")
    return manifest


def manifest_fingerprint(shard_dir: str | os.PathLike) -> str:
    """The identity of a shard folder's data: the sha256 of its manifest.json, which records
    every shard's sha256. Checkpoints and evaluation results record it. Raises ShardError when
    the manifest is missing (see load_manifest)."""
    load_manifest(shard_dir)
    return sha256_file(Path(shard_dir) / MANIFEST)


def listed_shards(manifest: dict) -> list[str]:
    """File names of the shards a manifest lists, in manifest order.

    Raises ShardError when an entry is not a plain file name (a manifest from elsewhere must
    not make us read or write outside its folder)."""
    names = []
    for entry in manifest["shards"]:
        name = entry["file"]
        if not is_plain_name(name):
            raise ShardError(
                f"{MANIFEST}: shard file {name!r} must be a plain file or folder name, without '/'"
            )
        names.append(name)
    return names


def shard_problems(shard_dir: str | os.PathLike) -> dict[str, str]:
    """Every shard of the folder that does not match its manifest: {file name: problem}.

    Checks, per listed shard: present, llm.c header, file size = header's token count, token
    count = manifest's, sha256 (so it reads every byte).
    Returns {} for a complete folder. Raises ShardError when the manifest is missing (prepare
    did not finish) or unreadable, or lists a name that is not a plain file name."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    listed_shards(manifest)  # rejects path-like names before any file is opened
    problems = {}
    for entry in manifest["shards"]:
        path = shard_dir / entry["file"]
        try:
            tokens = read_num_tokens(path)
        except ShardError as e:
            problems[entry["file"]] = str(e)
            continue
        if tokens != entry["tokens"]:
            problems[entry["file"]] = f"{path}: {tokens} tokens, {MANIFEST} says {entry['tokens']}"
        elif sha256_file(path) != entry["sha256"]:
            problems[entry["file"]] = f"{path}: sha256 differs from {MANIFEST} (altered bytes)"
    return problems


def verify_shard_folder(shard_dir: str | os.PathLike) -> dict:
    """Check every listed shard against the manifest (see shard_problems); returns the manifest.
    Raises ShardError naming every file that does not match, or a missing manifest."""
    problems = shard_problems(shard_dir)
    if problems:
        raise ShardError(
            f"{len(problems)} shard(s) of {shard_dir} do not match {MANIFEST}:\n  "
            + "\n  ".join(problems.values())
        )
    return load_manifest(shard_dir)


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """The shards of one split, memory-mapped: `shards[i]` is (tokens_i,) uint16."""

    name: str
    files: list[Path]
    shards: list[np.memmap]
    shard_dir: Path | None = None
    """The folder, absolute."""
    fingerprint: str | None = None
    """manifest_fingerprint of the folder: which data this is."""

    def identity(self) -> dict[str, str | None]:
        """What checkpoints and evaluation results record of the data: the absolute folder and
        its manifest fingerprint."""
        return {"shard_dir": str(self.shard_dir), "manifest_fingerprint": self.fingerprint}

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)


def open_split(
    shard_dir: str | os.PathLike,
    split: str,
    vocab_size: int | None = None,
    verify_checksums: bool = False,
) -> Split:
    """Open every shard of `split` listed in the manifest, in manifest order.

    Checks, before any training: the manifest exists; each listed shard exists with the header,
    size and token count the manifest records; every shard file of the folder's prefix is
    listed, under the split its name says; the split's tokens add up to the manifest's
    per-split total; the tokenizer's vocabulary equals vocab_size when given; with
    verify_checksums, each file's sha256 (reads every byte). Raises ShardError naming the file.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    if manifest.get("tokenizer") != TOKENIZER:
        raise ShardError(
            f"{shard_dir}: shards were tokenized with {manifest.get('tokenizer')!r}, this "
            f"pipeline's models use {TOKENIZER!r}: prepare the data again"
        )
    if vocab_size is not None and manifest.get("vocab_size") != vocab_size:
        raise ShardError(
            f"{shard_dir}: shards were tokenized with {manifest.get('tokenizer')!r} "
            f"(vocab_size {manifest.get('vocab_size')}), the model expects vocab_size "
            f"{vocab_size}: set model.vocab_size to match or prepare the data again"
        )
    _check_listing(shard_dir, manifest)
    files, shards = [], []
    for entry in manifest["shards"]:
        if entry["split"] != split:
            continue
        path = shard_dir / entry["file"]
        n = read_num_tokens(path)
        if n != entry["tokens"]:
            raise ShardError(
                f"{path}: holds {n} tokens, manifest.json says {entry['tokens']}: the folder "
                "mixes outputs of different prepare runs; delete it and prepare again"
            )
        if verify_checksums and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from manifest.json; prepare again")
        files.append(path)
        shards.append(open_shard(path))
    if not shards:
        raise ShardError(
            f"{shard_dir}: manifest.json lists no {split!r} shards; prepare with more data "
            f"(or a non-zero val_tokens for validation)"
        )
    recorded = manifest.get("splits", {}).get(split, {}).get("tokens")
    total = sum(len(s) for s in shards)
    if recorded is not None and total != recorded:
        raise ShardError(
            f"{shard_dir / MANIFEST}: its {split!r} shards hold {total:,} tokens but its "
            f"splits.{split}.tokens records {recorded:,}: the manifest was edited; restore it "
            "or prepare the data again"
        )
    return Split(split, files, shards, shard_dir.resolve(), manifest_fingerprint(shard_dir))


def _check_listing(shard_dir: Path, manifest: dict) -> None:
    """Raise ShardError, naming the file, for a shard of this folder's prefix that the manifest
    does not list (removed from it) or lists under the other split (relabelled): the loader
    reads exactly what prepare wrote."""
    listed = set(listed_shards(manifest))
    prefix = re.escape(str(manifest.get("name", "")))
    pattern = re.compile(rf"{prefix}_({'|'.join(SPLITS)})_\d{{6,}}\.bin")
    unlisted = sorted(
        p.name for p in shard_dir.iterdir() if pattern.fullmatch(p.name) and p.name not in listed
    )
    if unlisted:
        raise ShardError(
            f"{shard_dir / unlisted[0]}: a shard file that {MANIFEST} does not list"
            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
            + ": the manifest was edited or the folder mixes prepare outputs; restore the "
            "manifest, or prepare the data again into an empty folder"
        )
    for entry in manifest["shards"]:
        named = pattern.fullmatch(entry["file"])
        if named and named.group(1) != entry["split"]:
            raise ShardError(
                f"{shard_dir / entry['file']}: a {named.group(1)!r} shard that {MANIFEST} lists "
                f"in the {entry['split']!r} split: the manifest was edited; restore it or "
                "prepare the data again"
            )
