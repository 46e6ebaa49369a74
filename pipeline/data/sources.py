"""Documents from a source: one `datasets` streaming path for hub and local sources (parquet
read a row group at a time, json lines, text), shuffled with a buffer when asked.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import inspect
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SourceConfig
from pipeline.errors import ConfigError, PrepareError, raise_if

# Extension -> `datasets` builder. The longest matching suffix wins (".jsonl.gz" before ".gz").
BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".txt": "text",
}
READ_BATCH = 256
"""Rows read from the `datasets` stream at a time."""
JSON_BUILDER_LOGGER = "datasets.packaged_modules.json.json"
"""The logger of `datasets`' json reader."""
READ_ERRORS = (ValueError, pa.ArrowException, OSError, EOFError)
"""What `datasets`' json and text readers raise for a file they cannot read: pyarrow's parse
errors, UnicodeDecodeError (a ValueError), gzip's BadGzipFile (an OSError) and EOFError."""


def resolve_files(source: SourceConfig) -> list[Path]:
    """The files of a local source: every glob of source.paths expanded, sorted, deduplicated
    (absolute paths). Raises ConfigError naming each pattern that matches no file."""
    files: set[Path] = set()
    problems = []
    for pattern in source.paths:
        matched = glob.glob(os.path.expanduser(pattern), recursive=True)
        matched = [Path(p).resolve() for p in matched if os.path.isfile(p)]
        if not matched:
            problems.append(
                f"source.paths: no file matches {pattern!r} (from {os.getcwd()}); "
                "fix the path or glob pattern"
            )
        files.update(matched)
    raise_if(problems)
    return sorted(files)


def builder_for(files: list[Path]) -> str:
    """The `datasets` builder that reads files: parquet, json or text.

    Raises ConfigError for an unknown extension or files of different kinds.
    """
    suffixes = sorted(BUILDERS, key=len, reverse=True)
    kinds: dict[str, list[str]] = {}
    for f in files:
        suffix = next((s for s in suffixes if f.name.endswith(s)), "")
        if not suffix:
            raise ConfigError(
                [f"{f}: unknown file type; source.paths takes {', '.join(BUILDERS)} files"]
            )
        kinds.setdefault(BUILDERS[suffix], []).append(f.name)
    if len(kinds) > 1:
        found = "; ".join(f"{k}: {', '.join(names[:3])}" for k, names in kinds.items())
        raise ConfigError(
            [f"source.paths mixes file types ({found}): use files of one type per source"]
        )
    return next(iter(kinds))


def _check_text_column(ds: datasets.IterableDataset, column: str, where: str) -> None:
    """Raise ConfigError unless the stream has `column`, listing the columns it has."""
    columns = ds.column_names
    if columns is None:  # features unknown until read (json, text): look at the first row
        first = next(iter(ds.take(1)), None)
        columns = list(first) if first is not None else [column]
    if column not in columns:
        raise missing_column(where, column, columns)


def missing_column(where: object, column: str, columns: list[str]) -> ConfigError:
    """The error for a source without the text column, listing the columns it has."""
    return ConfigError(
        f"{where} has no column {column!r}; its columns are {columns}: set "
        "source.text_column to the one holding the document text"
    )


def open_source(source: SourceConfig) -> datasets.IterableDataset:
    """The source as a `datasets` stream of rows with one column, source.text_column,
    shuffled and truncated as configured. Nothing is downloaded into a cache.

    Raises ConfigError (invalid source, no file matches a pattern, unknown or mixed file types,
    missing text column), PrepareError (the hub dataset cannot be opened) or UnreadableFileError
    (the first rows of a json lines or text file cannot be read) before any document is
    tokenized.
    """
    return _open(source)[0]


def _open(source: SourceConfig) -> tuple[datasets.IterableDataset, list[Path]]:
    """open_source's stream, and the local json lines or text files it reads ([] for parquet
    and hub sources): the files `_reading` looks into when the stream fails."""
    raise_if(source.problems())
    column_checked = False
    text_files: list[Path] = []
    if source.kind == "local":
        files = resolve_files(source)
        builder = builder_for(files)
        if builder == "parquet":
            ds = parquet_stream(files, source.text_column)
            column_checked = True  # in every file's footer, without reading a row
        else:
            # A plain-text file is one document: EOT marks document boundaries, and a line of
            # a book or a play is not a document.
            extra = {"sample_by": "document"} if builder == "text" else {}
            data_files = [str(f) for f in files]
            ds = datasets.load_dataset(
                builder, data_files=data_files, split="train", streaming=True, **extra
            )
            text_files = files
            # Its json reader logs every parse error before raising it; _reading reports it.
            logging.getLogger(JSON_BUILDER_LOGGER).setLevel(logging.CRITICAL)
        where = f"{files[0]}" if len(files) == 1 else f"source.paths ({len(files)} files)"
    else:
        where = f"{source.dataset} ({source.config_name or 'default'} config)"
        try:
            ds = _load_hub(source)
        except Exception as e:  # network, authentication, unknown dataset or config
            raise PrepareError(
                f"cannot open hub dataset {where}, split {source.split!r}: "
                f"{type(e).__name__}: {e}. Check the name, the network (HF_HUB_OFFLINE) and "
                "access, or use a local source (source=local)"
            ) from e
    if not column_checked:
        with _reading(text_files):
            _check_text_column(ds, source.text_column, where)
    ds = ds.select_columns([source.text_column])
    if source.shuffle_buffer > 0:
        ds = _shuffle(ds, source.shuffle_seed, source.shuffle_buffer)
    if source.max_documents is not None:
        ds = ds.take(source.max_documents)
    return ds, text_files


class UnreadableFileError(PrepareError):
    """A json lines or text file of a local source with a line (or bytes) that cannot be read.

    `intact_bytes`: how much of the file comes before the bad line, all that a run stopped by
    it can have read (decompressed, for .gz). A run started again after the file is repaired
    continues when those bytes are unchanged (pipeline.data.progress.record_repair).
    """

    def __init__(self, path: Path, where: str, problem: str, intact_bytes: int, fix: str):
        self.path, self.intact_bytes = path, intact_bytes
        super().__init__(
            f"{path}, {where}: {problem}: {fix} and run the same command again (prepare keeps "
            "the shards it completed and continues from them)"
        )


def find_unreadable(files: list[Path]) -> UnreadableFileError | None:
    """The first place, in file order, that `datasets`' json or text reader cannot read: a
    line that is not UTF-8 or not a JSON object (json), bytes that are not UTF-8 (text), a
    .gz file that does not decompress; None when every file reads."""
    for path in files:
        try:
            if builder_for([path]) == "text":
                found = _text_problem(path)
            else:
                found = _json_problem(path)
        except (OSError, EOFError) as e:  # a damaged .gz, or a file gone since
            return UnreadableFileError(path, "the file", f"cannot be read ({e})", 0, "replace it")
        if found is not None:
            return found
    return None


def _text_problem(path: Path) -> UnreadableFileError | None:
    """Where a plain-text file is not UTF-8. The file is one document that a run reads whole or
    not at all, so nothing of it needs to stay as it is."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"byte offset {e.start:,} (line {line})"
        return UnreadableFileError(path, where, f"not UTF-8 ({e.reason})", 0, "save it as UTF-8")
    return None


def _json_problem(path: Path) -> UnreadableFileError | None:
    """The first line of a json lines file that is not UTF-8 or not JSON objects (blank lines
    and several objects on a line read, as in pyarrow); a file that starts with `[` is one JSON
    array, read whole."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.lstrip().startswith(b"["):
                return _json_array_problem(raw + f.read(), path)
            try:
                problem = _json_line_problem(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 ({e.reason} at byte offset {offset + e.start:,})"
            if problem:
                fix = "fix or delete that line"
                return UnreadableFileError(path, f"line {number:,}", problem, offset, fix)
            offset += len(raw)
    return None


def _json_line_problem(line: str) -> str | None:
    """What keeps one line of json lines from reading as JSON objects, or None."""
    decoder, pos = json.JSONDecoder(), 0
    while True:
        while pos < len(line) and line[pos].isspace():
            pos += 1
        if pos == len(line):
            return None
        try:
            value, pos = decoder.raw_decode(line, pos)
        except json.JSONDecodeError as e:
            return f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        if not isinstance(value, dict):
            return f"a JSON {type(value).__name__}, not an object {{...}}"


def _json_array_problem(data: bytes, path: Path) -> UnreadableFileError | None:
    """Where a file holding one JSON array fails to parse (read whole or not at all)."""
    fix = "fix the file"
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return UnreadableFileError(path, f"line {line:,}", f"not UTF-8 ({e.reason})", 0, fix)
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        return UnreadableFileError(path, f"line {e.lineno:,}", problem, 0, fix)
    return None


@contextlib.contextmanager
def _reading(files: list[Path]) -> Iterator[None]:
    """Turn an error reading the json lines or text `files` into an UnreadableFileError naming
    the file and its line (json) or byte offset (text): `datasets` names neither (its row
    number counts from the start of a 10 MiB read block). The files are scanned only once the
    stream has failed; an error that the scan cannot place in them is raised unchanged."""
    try:
        yield
    except READ_ERRORS as e:
        if isinstance(e, PrepareError) or not files:
            raise
        found = find_unreadable(files)
        if found is None:
            raise
        raise found from e


def parquet_stream(files: list[Path], column: str) -> datasets.IterableDataset:
    """Local parquet files as a `datasets` stream of `{column: text}` rows, read one row group
    at a time; sharded by (file, row group), so a shuffle also shuffles the row groups, as
    `datasets`' own parquet reader does.

    Not `load_dataset("parquet", ...)`: its pyarrow scanner reads ahead on background threads
    whenever the consumer is slower than the disk (tokenizing always is), and holds up to the
    whole file in the main process: peak memory grew with the input (+6.6 MiB per million
    tokens in `make bench`). Here the reading process holds one row group.

    Raises ConfigError when a file lacks the column or is not readable parquet (checked from
    the file footers, before any document is read).
    """
    shards = []
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(
                [f"{f} is not a readable parquet file ({e}): replace it or remove it"]
            ) from e
        names = meta.schema_arrow.names
        if column not in names:
            raise missing_column(f, column, names)
        shards += [(str(f), g) for g in range(meta.num_row_groups)]
    # No `features`: with them, `datasets` encodes and decodes every row again (a third of the
    # reading process's time); _texts checks the values are strings.
    return datasets.IterableDataset.from_generator(
        _parquet_rows, gen_kwargs={"shards": shards, "column": column}
    )


def _parquet_rows(shards: list[tuple[str, int]], column: str) -> Iterator[dict[str, str]]:
    """The rows of the (file, row group) shards, READ_BATCH at a time. Raises PrepareError
    naming the file when a row group cannot be read."""
    path, file = None, None
    for shard_path, group in shards:
        try:
            if shard_path != path:
                path, file = shard_path, pq.ParquetFile(shard_path)
            batches = file.iter_batches(
                batch_size=READ_BATCH, row_groups=[group], columns=[column], use_threads=False
            )
            for batch in batches:
                for text in batch.column(0).to_pylist():
                    yield {column: text}
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(
                f"{shard_path}: row group {group} cannot be read ({type(e).__name__}: {e}); "
                "the file is damaged: replace it, or remove it from source.paths"
            ) from e


def _load_hub(source: SourceConfig) -> datasets.IterableDataset:
    """Stream a hub dataset (or a local dataset folder given as source.dataset); a parquet
    dataset, as FineWeb is, is asked for the text column only (FineWeb rows also carry id,
    url, dump, date, ...)."""
    kwargs = {
        "name": source.config_name,
        "split": source.split,
        "revision": source.revision,
        "streaming": True,
    }
    try:
        ds = datasets.load_dataset(source.dataset, **kwargs, columns=[source.text_column])
    except ValueError as e:  # a json/csv/text builder: its config has no `columns`
        if "doesn't have a" not in str(e):
            raise
    else:
        if source.text_column in (ds.column_names or []):
            return ds
    # Without it; also when the text column is missing, so that the error lists the columns
    # the dataset has rather than none.
    return datasets.load_dataset(source.dataset, **kwargs)


def _shuffle(ds: datasets.IterableDataset, seed: int, buffer_size: int) -> datasets.IterableDataset:
    """Buffer-shuffle the stream (and the order of its files or shards) with a fixed seed."""
    extra = {}
    if ds.num_shards == 1 and "max_buffer_input_shards" in inspect.signature(ds.shuffle).parameters:
        # Interleaving a single shard changes no order, but datasets ends every interleaved
        # parquet stream with a 5 s pause (its workaround for apache/arrow#45214).
        extra["max_buffer_input_shards"] = 1
    return ds.shuffle(seed=seed, buffer_size=buffer_size, **extra)


def _texts(ds: datasets.IterableDataset, column: str, files: list[Path]) -> Iterator[str]:
    """The column's values, read READ_BATCH rows at a time (one Python dict per row costs the
    reading process more than the whole batch). `files`: the json lines or text files behind
    the stream, named with the line or byte that cannot be read if it fails (see _reading)."""
    start = 0
    with _reading(files):
        for batch in ds.iter(batch_size=READ_BATCH):
            texts = batch[column]
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise PrepareError(
                        f"document {start + i} of the stream has {type(text).__name__} in "
                        f"column {column!r}, not text: set source.text_column to a string "
                        "column or clean the data"
                    )
            start += len(texts)
            yield from texts


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """The documents of a source, in stream order (shuffled when source.shuffle_buffer > 0).

    The source is opened and checked when this is called (see `open_source` for the errors),
    so a bad source fails before any work; the documents are then read lazily, and a json lines
    or text file that cannot be read stops them with an UnreadableFileError.
    """
    ds, files = _open(source)
    return _texts(ds, source.text_column, files)
