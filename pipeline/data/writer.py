"""The prepare stage's library, `prepare(cfg)`: documents -> uint16 token shards + manifest.json.

    python -m pipeline.prepare                                   # FineWeb sample-10BT from the hub
    python -m pipeline.prepare source=local 'source.paths=[data/*.parquet]' name=mini \\
        shard_size=1000000 val_tokens=250000

Output `<out_dir>/<name>/`: `<name>_val_000000.bin ...`, then `<name>_train_<index>.bin ...`
(one index across both splits), and `manifest.json`, written last. Validation takes whole
documents from the start of the (optionally shuffled) stream until it holds at least val_tokens
tokens; everything after is training data. The bytes depend only on the source, shard_size and
val_tokens, never on num_workers or on how often the run was stopped and started again.

Resume: after every completed shard `.progress.json` (pipeline.data.progress) records the
completed shards and the stream position (documents whose tokens are all in completed shards, plus
the tokens of the next document already written). A run started again with the same settings
skips those documents without tokenizing them, drops the already-written head of the next one,
and carries on. The shard and manifest format is pipeline.data.shards'.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import PrepareConfig, as_dict
from pipeline.data.progress import (
    PROGRESS,
    SETTINGS_KEYS,
    Progress,
    fingerprint,
    record_repair,
    recorded_settings,
    settings_diff,
)
from pipeline.data.shards import (
    MANIFEST,
    MANIFEST_VERSION,
    SPLITS,
    build_manifest,
    load_manifest,
    read_num_tokens,
    shard_name,
    write_manifest,
    write_shard,
)
from pipeline.data.sources import UnreadableFileError, iter_documents, resolve_files
from pipeline.data.tokenizer import TOKENIZER, get_encoding, split_documents, tokenize_documents
from pipeline.errors import PrepareError, ShardError, raise_if
from pipeline.files import DISK_FULL, folder_lock

MAX_SHARD_SIZE = 2**31 - 1


# --------------------------------------------------------------------------- settings


def settings_of(cfg: PrepareConfig) -> dict[str, Any]:
    """The settings the output depends on, as recorded in the manifest and progress file.

    For a local source this includes every resolved file with its size in bytes, so changed
    input files count as different settings. Raises ConfigError when no file matches a pattern.
    """
    source = as_dict(cfg.source)
    if cfg.source.kind == "local":
        files = resolve_files(cfg.source)
        source["files"] = [{"path": str(f), "bytes": f.stat().st_size} for f in files]
    return {
        "format_version": MANIFEST_VERSION,
        "name": cfg.dataset_name,
        "tokenizer": TOKENIZER,
        "source": source,
        "shard_size": cfg.shard_size,
        "val_tokens": cfg.val_tokens,
    }


def _output_problems(cfg: PrepareConfig) -> list[str]:
    """Problems of the output settings that PrepareConfig.problems() does not know about."""
    out = []
    name = cfg.dataset_name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        out.append(f"name={name!r} must be a plain folder name (it becomes <out_dir>/<name>/)")
    if cfg.shard_size > MAX_SHARD_SIZE:
        out.append(
            f"shard_size={cfg.shard_size} exceeds {MAX_SHARD_SIZE}: the shard header stores the "
            "token count as int32"
        )
    return out


# --------------------------------------------------------------------------- shard writer


class ShardWriter:
    """Cuts a stream of documents into shards: validation first, whole documents until it holds
    at least val_tokens, then training; shard_size tokens per shard except the last of a split.

    Every completed shard is written atomically and recorded with `save(progress)` before the
    next one starts, so a stopped run can continue from the last record.
    """

    def __init__(
        self,
        out: Path,
        prefix: str,
        shard_size: int,
        val_tokens: int,
        progress: Progress,
        save: Callable[[Progress], None],
    ):
        self.out, self.prefix = out, prefix
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.save = save
        self.shards = list(progress.shards)
        self.split = progress.split
        self.documents = progress.documents
        self.split_documents = dict(progress.split_documents)
        self.split_tokens = {s: progress.split_tokens(s) for s in SPLITS}  # written + pending
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        if progress.doc_tokens_written == 0:  # at a document boundary: val may be full already
            self._close_val_if_full()

    def add(self, doc: np.ndarray, skip: int = 0) -> None:
        """Append one document ((n,) uint16 starting with EOT) whose first `skip` tokens are
        already in completed shards. Writes every shard it completes. Raises PrepareError when
        the disk is full."""
        rest = doc[skip:]
        written = skip
        while self.pending_tokens + len(rest) >= self.shard_size:
            take = self.shard_size - self.pending_tokens
            self._append(rest[:take])
            rest, written = rest[take:], written + take
            done = int(len(rest) == 0)  # the cut fell exactly at the end of this document
            split_documents = {**self.split_documents}
            split_documents[self.split] += done
            self._write(self.split, self.documents + done, 0 if done else written, split_documents)
        if len(rest):
            self._append(rest)
        self.documents += 1
        self.split_documents[self.split] += 1
        self._close_val_if_full()

    def finish(self) -> Progress:
        """Write the last shard; returns the final state. Raises PrepareError when the stream
        left no training tokens."""
        if self.split == "val" or self.split_tokens["train"] + self.pending_tokens == 0:
            raise PrepareError(
                f"the source gave {self.documents:,} documents "
                f"({sum(self.split_tokens.values()):,} tokens) and nothing is left for training "
                f"after the validation split (val_tokens={self.val_tokens:,}): lower val_tokens "
                "or use more documents (source.max_documents), with overwrite=true"
            )
        if self.pending_tokens:
            self._write("train", self.documents, 0, dict(self.split_documents))
        return Progress(self.shards, self.documents, 0, self.split, dict(self.split_documents))

    def _append(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.split_tokens[self.split] += len(tokens)

    def _close_val_if_full(self) -> None:
        """After a whole document: once validation holds val_tokens, write its last shard and
        send the following documents to training."""
        if self.split == "val" and self.split_tokens["val"] >= self.val_tokens:
            self.split = "train"
            if self.pending_tokens:
                self._write("val", self.documents, 0, dict(self.split_documents))

    def _write(
        self, split: str, documents: int, doc_tokens_written: int, split_documents: dict[str, int]
    ) -> None:
        """Write the pending tokens as the next shard of `split`, then record the progress."""
        tokens = np.concatenate(self.pending)
        self.pending, self.pending_tokens = [], 0
        name = shard_name(self.prefix, split, len(self.shards))
        try:
            sha256 = write_shard(self.out / name, tokens)
            shards = self.shards + [
                {"file": name, "split": split, "tokens": len(tokens), "sha256": sha256}
            ]
            self.save(Progress(shards, documents, doc_tokens_written, self.split, split_documents))
        except OSError as e:  # a full disk, or another write failure
            what = "the disk is full" if e.errno in DISK_FULL else "a write failed"
            raise PrepareError(
                f"{what}: writing {self.out / name} failed ({e.strerror or e}). "
                f"{len(self.shards)} shards ({sum(s['tokens'] for s in self.shards):,} tokens) "
                f"are complete and recorded in {self.out / PROGRESS}; free some space (or fix "
                "the folder) and run the same command again: it continues from there"
            ) from e
        self.shards = shards


# --------------------------------------------------------------------------- output folder


def _recorded_settings(out: Path) -> tuple[str, dict[str, Any]] | None:
    """(what, settings) recorded in the output folder: the manifest of a finished run, else the
    progress file of an unfinished one; None when neither exists."""
    if (out / MANIFEST).is_file():
        try:
            manifest = load_manifest(out)
        except ShardError:  # unreadable: treated as output of other settings
            return "finished", {}
        return "finished", {k: manifest.get(k) for k in SETTINGS_KEYS}
    if (out / PROGRESS).is_file():
        return "unfinished", recorded_settings(out)
    return None


def _own_files(out: Path, prefix: str) -> list[Path]:
    """Files a prepare run writes into `out`: shards, temporaries, manifest, progress file."""
    if not out.is_dir():
        return []
    names = {MANIFEST, PROGRESS}
    return sorted(
        p
        for p in out.iterdir()
        if p.name in names or p.name.endswith(".tmp") or p.name.startswith(f"{prefix}_")
    )


def _output_state(out: Path, prefix: str, settings: dict[str, Any]) -> str:
    """'complete', 'unfinished' (same settings), 'empty', or 'different' (output of other
    settings, or shard files that no manifest or progress file accounts for)."""
    recorded = _recorded_settings(out)
    if recorded is None:
        stray = [p for p in _own_files(out, prefix) if p.suffix == ".bin"]
        return "different" if stray else "empty"
    what, old = recorded
    if fingerprint(old) != fingerprint(settings):
        return "different"
    return "complete" if what == "finished" else "unfinished"


def _different_output_error(out: Path, prefix: str, settings: dict[str, Any]) -> PrepareError:
    recorded = _recorded_settings(out)
    if recorded is None:
        what = "shard files that no manifest.json or .progress.json accounts for"
    else:
        changes = settings_diff(recorded[1], settings)
        what = f"{recorded[0]} output of different settings ({changes})"
    return PrepareError(
        f"{out} holds {what}: set overwrite=true to delete it and prepare again, or choose "
        "another name or out_dir"
    )


def _check_writable(out: Path) -> None:
    """Create `out` and write a test file in it. Raises PrepareError naming the directory."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass
    except OSError as e:
        raise PrepareError(
            f"output directory {out} cannot be written ({type(e).__name__}: {e.strerror or e}): "
            "choose another out_dir, or fix the path or its permissions"
        ) from e


def _resume(out: Path, prefix: str) -> Progress:
    """The progress of an unfinished run, after checking its shards and deleting files that it
    does not record (temporaries, a shard completed after the last record). Raises PrepareError
    when a recorded shard is missing or damaged."""
    progress = Progress.load(out)
    recorded = {s["file"] for s in progress.shards}
    for shard in progress.shards:
        path = out / shard["file"]
        try:
            ok = read_num_tokens(path) == shard["tokens"]
        except ShardError:
            ok = False
        if not ok:
            raise PrepareError(
                f"{path} is missing or damaged although {out / PROGRESS} records it: delete "
                f"{out} and prepare again"
            )
    for p in _own_files(out, prefix):
        if p.name.endswith(".tmp") or (p.suffix == ".bin" and p.name not in recorded):
            p.unlink()
    return progress


# --------------------------------------------------------------------------- the stage


def _tokenize_into(
    writer: ShardWriter, docs: Iterator[str], progress: Progress, cfg: PrepareConfig
) -> int:
    """Feed the stream from the recorded position into writer; returns tokens added."""
    docs = itertools.islice(docs, progress.documents, None)  # skipped, not tokenized
    skip = progress.doc_tokens_written  # dropped from the first document only
    added = 0
    bar = tqdm(
        desc=f"prepare {cfg.dataset_name}",
        unit="tok",
        unit_scale=True,
        initial=sum(s["tokens"] for s in progress.shards),
        disable=not cfg.progress,
    )
    batches = tokenize_documents(docs, cfg.num_workers, cfg.docs_per_task)
    with bar, closing(batches):
        for tokens in batches:
            new = len(tokens) - skip
            for doc in split_documents(tokens):
                writer.add(doc, skip)
                skip = 0
            added += new
            bar.update(new)
            bar.set_postfix(docs=f"{writer.documents:,}", refresh=False)
    return added


def _start(out: Path, prefix: str, settings: dict[str, Any], state: str) -> Progress:
    """The progress to start from: recorded (state 'unfinished') or a fresh record, after
    deleting output of other settings (state 'different', overwrite=true)."""
    if state == "unfinished":
        progress = _resume(out, prefix)
        print(
            f"resuming {out}: {len(progress.shards)} shards complete; skipping "
            f"{progress.documents:,} documents and {progress.doc_tokens_written:,} tokens "
            "of the next"
        )
        return progress
    if state == "different":
        print(f"overwrite=true: deleting the previous output in {out}")
        for p in _own_files(out, prefix):
            p.unlink()
    progress = Progress()
    progress.save(out, settings)  # from now on the folder is known to be this run's
    return progress


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize cfg.source into shards and a manifest under `<out_dir>/<name>/`; returns that
    folder. Continues an unfinished run of the same settings; does nothing for a finished one.

    Raises ConfigError (invalid values, no file matches, unknown file type, missing text column)
    or PrepareError (output of other settings without overwrite, unwritable output directory,
    full disk, token ids beyond uint16, no training data left) - all but the last two before any
    document is tokenized.
    """
    raise_if(cfg.problems() + _output_problems(cfg))
    out = Path(cfg.out_dir) / cfg.dataset_name
    prefix = cfg.dataset_name
    settings = settings_of(cfg)
    if _state_to_continue(out, prefix, settings, cfg.overwrite) is None:
        return out
    docs = iter_documents(cfg.source)  # opens and checks the source
    get_encoding()
    _check_writable(out)
    with folder_lock(out, "prepare output", "name or out_dir"):  # a second prepare stops here
        return _prepare_locked(cfg, out, settings, docs)


def _state_to_continue(
    out: Path, prefix: str, settings: dict[str, Any], overwrite: bool
) -> str | None:
    """The output folder's state (see _output_state), or None when it is complete (said).
    Raises PrepareError for output of other settings without overwrite."""
    state = _output_state(out, prefix, settings)
    if state == "complete":
        print(f"{out} is already complete ({MANIFEST} matches these settings): nothing to do")
        return None
    if state == "different" and not overwrite:
        raise _different_output_error(out, prefix, settings)
    return state


def _prepare_locked(
    cfg: PrepareConfig, out: Path, settings: dict[str, Any], docs: Iterator[str]
) -> Path:
    """prepare under the output folder's lock: its state read again (another process may have
    written it before the lock was taken), then the shards, the manifest and the summary."""
    prefix = cfg.dataset_name
    state = _state_to_continue(out, prefix, settings, cfg.overwrite)
    if state is None:
        return out
    progress = _start(out, prefix, settings, state)

    start = time.perf_counter()
    writer = ShardWriter(
        out, prefix, cfg.shard_size, cfg.val_tokens, progress, lambda p: p.save(out, settings)
    )
    try:
        added = _tokenize_into(writer, docs, progress, cfg)
    except UnreadableFileError as e:  # completed shards stay; the repaired file continues
        record_repair(out, e.path, e.intact_bytes)
        raise
    final = writer.finish()
    manifest = build_manifest(settings, final.shards, final.split_documents)
    write_manifest(out, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    _print_summary(out, manifest, added, time.perf_counter() - start)
    return out


def _print_summary(out: Path, manifest: dict[str, Any], added: int, seconds: float) -> None:
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    print(
        f"prepared {out}: val {val['documents']:,} documents {val['tokens']:,} tokens, "
        f"train {train['documents']:,} documents {train['tokens']:,} tokens, "
        f"{len(manifest['shards'])} shards; {added:,} tokens this run in {seconds:.1f} s, "
        f"{added / max(seconds, 1e-9):,.0f} tokens/s"
    )
