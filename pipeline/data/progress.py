"""The prepare stage's resumable record: `.progress.json` in the output folder.

After every completed shard the record holds the settings the bytes depend on (and their
fingerprint), the completed shards and the stream position: documents whose tokens are all in
completed shards, plus the tokens of the next document already written. A run started again with
the same settings continues from it; the manifest replaces it when the run finishes.

A run stopped by a file it cannot read (a broken json line, bytes that are not UTF-8) notes the
file under REPAIRS: started again, it accepts the repaired file although its size changed, as
long as the part before the bad line, all that the completed shards can hold of it, is unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.shards import SPLITS
from pipeline.files import write_json_atomic

PROGRESS = ".progress.json"
ORDER = "stream_order"
REPAIRS = "repairs"
SETTINGS_KEYS = ("format_version", "name", "tokenizer", "source", "shard_size", "val_tokens")
"""What the bytes depend on: a run with other values for these writes other shards."""
STREAM_ORDER = 2
"""Version of the order in which the stage reads documents. A progress record of another
version cannot be continued: the stream position it records would point elsewhere. 2: local
parquet read by row group (`sources.parquet_stream`), which shuffles differently from 1
(`datasets`' parquet builder; its records carry no version)."""


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'key: old -> new' for each differing setting (source keys one level down)."""
    changes = []
    for key in SETTINGS_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [
                f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    if ORDER in old:
        changes.append(
            f"{ORDER}: {old[ORDER]} -> {STREAM_ORDER} (an earlier version of the prepare stage "
            "started this run and read the documents in another order)"
        )
    return "; ".join(changes) or "(unreadable record)"


def recorded_settings(out: Path) -> dict[str, Any]:
    """The settings `<out>/.progress.json` records; {} when it is unreadable. A record of
    another stream order also carries that order under ORDER, so it differs from every
    setting of this version."""
    try:
        record = json.loads((out / PROGRESS).read_text())
        settings = record["settings"]
    except (json.JSONDecodeError, KeyError):
        return {}
    for repair in record.get(REPAIRS, []):
        _accept_repair(settings, repair)
    order = record.get(ORDER, 1)
    return settings if order == STREAM_ORDER else {**settings, ORDER: order}


def _head_sha256(path: Path, size: int) -> str | None:
    """sha256 of the first `size` bytes of a file (decompressed, for .gz); None when the file
    is missing, unreadable or shorter."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(size)
    except (OSError, EOFError):
        return None
    return hashlib.sha256(head).hexdigest() if len(head) == size else None


def record_repair(out: Path, path: Path, intact_bytes: int) -> None:
    """Note in `<out>/.progress.json` that `path` stopped the run after its first intact_bytes
    bytes: a run started again takes the file's new size as the recorded one while those bytes
    are unchanged (recorded_settings), so the repaired file continues the run. Nothing is noted
    without a progress record (no shard completed yet: nothing to keep)."""
    try:
        record = json.loads((out / PROGRESS).read_text())
    except (OSError, json.JSONDecodeError):
        return
    entry = {"path": str(path), "bytes": intact_bytes, "sha256": _head_sha256(path, intact_bytes)}
    others = [r for r in record.get(REPAIRS, []) if r["path"] != entry["path"]]
    write_json_atomic(out / PROGRESS, {**record, REPAIRS: [*others, entry]})


def _accept_repair(settings: dict[str, Any], repair: dict[str, Any]) -> None:
    """Give the repaired file its current size in `settings` when its intact head is
    unchanged."""
    path = Path(repair["path"])
    if repair["sha256"] is None or _head_sha256(path, repair["bytes"]) != repair["sha256"]:
        return
    for entry in settings.get("source", {}).get("files", []):
        if entry["path"] == repair["path"]:
            entry["bytes"] = path.stat().st_size


@dataclass
class Progress:
    """A run's state after its last completed shard (the content of `.progress.json`)."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    """Completed shards in order: {"file", "split", "tokens", "sha256"}."""
    documents: int = 0
    """Stream documents whose tokens are all in completed shards."""
    doc_tokens_written: int = 0
    """Tokens of the next document (index `documents`) already in completed shards."""
    split: str = "val"
    """Split that the next tokens go to."""
    split_documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    """Per split: documents whose tokens are all in completed shards."""

    def split_tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.shards if s["split"] == split)

    def save(self, out: Path, settings: dict[str, Any]) -> None:
        """Write `<out>/.progress.json` atomically (the previous one stays whole on failure)."""
        record = {
            "fingerprint": fingerprint(settings),
            "settings": settings,
            ORDER: STREAM_ORDER,
            **asdict(self),
        }
        write_json_atomic(out / PROGRESS, record)

    @classmethod
    def load(cls, out: Path) -> Progress:
        """The record in `<out>/.progress.json`."""
        record = json.loads((out / PROGRESS).read_text())
        return cls(**{k: record[k] for k in cls.__dataclass_fields__})
