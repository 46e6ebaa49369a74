"""The prepare stage on real FineWeb documents: round trip, determinism, resume, errors."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.paths import REPO
from hydra import compose, initialize_config_dir

from pipeline.config import PrepareConfig, SourceConfig, conf_dir, register_configs, to_dataclass
from pipeline.config.prepare import MIN_SHARD_SIZE
from pipeline.data import shards, sources
from pipeline.data import tokenizer as tok
from pipeline.data.progress import PROGRESS
from pipeline.data.writer import prepare
from pipeline.errors import ConfigError, PrepareError

NUM_DOCS = 400  # documents of the sample used by most tests: ~390k tokens
SHARD_SIZE = 50_000
VAL_TOKENS = 100_000


def make_cfg(out_dir: Path, paths: list[str], **overrides) -> PrepareConfig:
    """A small, quiet, single-worker config; `source_*` keys go to the source."""
    source_keys = {k[len("source_") :]: v for k, v in overrides.items() if k.startswith("source_")}
    rest = {k: v for k, v in overrides.items() if not k.startswith("source_")}
    source = SourceConfig(**{"name": "sample", "kind": "local", "paths": paths, **source_keys})
    base = dict(
        out_dir=str(out_dir),
        shard_size=SHARD_SIZE,
        val_tokens=VAL_TOKENS,
        num_workers=1,
        docs_per_task=64,
        progress=False,
    )
    return PrepareConfig(source=source, **{**base, **rest})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def sample_docs(path: Path, n: int | None = None) -> list[str]:
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return docs if n is None else docs[:n]


def decode_stream(folder: Path) -> list[str]:
    """Documents decoded from all shards in manifest order (each starts at an EOT)."""
    manifest = shards.load_manifest(folder)
    stream = np.concatenate([shards.open_shard(folder / s["file"]) for s in manifest["shards"]])
    enc = tok.get_encoding()
    return [enc.decode(d[1:].tolist()) for d in tok.split_documents(np.asarray(stream))]


def check_output(folder: Path, docs: list[str], shard_size: int, val_tokens: int) -> None:
    """Everything the format promises about a finished output folder."""
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    assert decode_stream(folder) == docs
    names = [s["file"] for s in manifest["shards"]]
    assert sorted(names + [shards.MANIFEST]) == sorted(p.name for p in folder.iterdir())
    splits = [s["split"] for s in manifest["shards"]]
    assert splits == sorted(splits, key=shards.SPLITS.index), "validation shards come first"
    for index, entry in enumerate(manifest["shards"]):
        path = folder / entry["file"]
        assert entry["file"] == shards.shard_name(manifest["name"], entry["split"], index)
        head = np.fromfile(path, dtype="<i4", count=shards.HEADER_INTS)
        assert (head[0], head[1], head[2]) == (shards.MAGIC, shards.VERSION, entry["tokens"])
        assert path.stat().st_size == shards.HEADER_BYTES + 2 * entry["tokens"]
        assert shards.sha256_file(path) == entry["sha256"]
    for split in shards.SPLITS:
        sizes = [s["tokens"] for s in manifest["shards"] if s["split"] == split]
        assert all(n == shard_size for n in sizes[:-1])
        assert all(0 < n <= shard_size for n in sizes[-1:])
        assert manifest["splits"][split]["tokens"] == sum(sizes)
        assert manifest["splits"][split]["shards"] == len(sizes)
    val_docs = manifest["splits"]["val"]["documents"]
    assert val_docs + manifest["splits"]["train"]["documents"] == len(docs)
    enc = tok.get_encoding()
    doc_tokens = [1 + len(enc.encode_ordinary(d)) for d in docs]
    # validation: the fewest whole documents that reach val_tokens
    assert manifest["splits"]["val"]["tokens"] == sum(doc_tokens[:val_docs])
    assert val_tokens == 0 or sum(doc_tokens[: val_docs - 1]) < val_tokens
    assert manifest["splits"]["val"]["tokens"] >= val_tokens
    for i, shard in enumerate(manifest["shards"]):  # each split starts with a document
        if i == 0 or shard["split"] != manifest["shards"][i - 1]["split"]:
            assert shards.open_shard(folder / shard["file"])[0] == tok.EOT
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["eot_token"]) == (
        "gpt2",
        tok.VOCAB_SIZE,
        tok.EOT,
    )
    assert (manifest["shard_size"], manifest["val_tokens"]) == (shard_size, val_tokens)


@pytest.fixture(scope="module")
def reference(fineweb_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-worker run over the first NUM_DOCS documents."""
    out = tmp_path_factory.mktemp("reference")
    return prepare(make_cfg(out, [str(fineweb_sample)], source_max_documents=NUM_DOCS))


# --------------------------------------------------------------------------- output


def test_round_trip(reference: Path, fineweb_sample: Path):
    check_output(reference, sample_docs(fineweb_sample, NUM_DOCS), SHARD_SIZE, VAL_TOKENS)
    manifest = shards.load_manifest(reference)
    assert manifest["splits"]["val"]["shards"] >= 2 and manifest["splits"]["train"]["shards"] >= 2
    files = manifest["source"]["files"]
    assert files == [
        {"path": str(fineweb_sample.resolve()), "bytes": fineweb_sample.stat().st_size}
    ]
    assert shards.open_split(reference, "train", vocab_size=tok.VOCAB_SIZE, verify_checksums=True)


def test_documents_span_several_shards(fineweb_sample: Path, tmp_path: Path):
    docs = sample_docs(fineweb_sample, 60)  # the 57th has 5,602 tokens
    longest = max(len(tok.tokenize_batch([d])) for d in docs)
    shard_size = longest // 3  # the longest document fills three shards or more
    assert shard_size >= MIN_SHARD_SIZE
    cfg = make_cfg(tmp_path, [str(fineweb_sample)], source_max_documents=60, shard_size=shard_size)
    cfg.val_tokens = 3 * shard_size
    check_output(prepare(cfg), docs, shard_size, 3 * shard_size)


def test_bytes_do_not_depend_on_workers(reference: Path, fineweb_sample: Path, tmp_path: Path):
    cfg = make_cfg(tmp_path, [str(fineweb_sample)], source_max_documents=NUM_DOCS, num_workers=2)
    cfg.docs_per_task = 7  # many small tasks in flight, finishing out of order
    assert folder_bytes(prepare(cfg)) == folder_bytes(reference)


def test_text_and_jsonl_sources(tmp_path: Path):
    texts = ["First file.\nTwo lines.\n", "Second file: <|endoftext|> stays text.", "Ünïcode ✓"]
    for name, text in zip(["a.txt", "b.txt", "c.txt"], texts, strict=True):
        (tmp_path / name).write_text(text, encoding="utf-8")
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[::-1])
    for pattern, docs in [
        ("*.txt", texts),  # one document per file, files in sorted order
        ("*.jsonl*", texts + texts[::-1]),  # .jsonl and .jsonl.gz are both json
    ]:
        size = MIN_SHARD_SIZE
        cfg = make_cfg(tmp_path / "out", [str(tmp_path / pattern)], shard_size=size, val_tokens=0)
        cfg.name = pattern.replace("*", "").replace(".", "")
        folder = prepare(cfg)
        check_output(folder, docs, size, 0)
        manifest = shards.load_manifest(folder)
        assert manifest["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": 0}
        assert manifest["shards"][0]["file"] == f"{cfg.name}_train_000000.bin"


FINEWEB_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
"""
"""The `configs` of HuggingFaceFW/fineweb's dataset card, cut to two."""


def test_hub_source_from_a_dataset_folder(fineweb_sample: Path, tmp_path: Path):
    """source.kind=hub goes through `datasets.load_dataset(source.dataset, name=...)`, which
    takes a dataset folder as well as a hub id. A folder laid out as FineWeb's repository gives
    the bytes of the local source for its `sample-10BT` config; a json dataset falls back from
    the parquet `columns` option; a missing column lists the real ones."""
    docs = sample_docs(fineweb_sample, 60)
    local = write_parquet(tmp_path / "docs.parquet", {"text": docs, "id": list(range(60))})
    fineweb = tmp_path / "fineweb"
    (fineweb / "sample" / "10BT").mkdir(parents=True)
    (fineweb / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (fineweb / "README.md").write_text(FINEWEB_CARD)
    shutil.copy(local, fineweb / "sample" / "10BT" / "000_00000.parquet")
    write_parquet(fineweb / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", {"text": ["x"]})
    json_dir = tmp_path / "json_dataset"
    json_dir.mkdir()
    (json_dir / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def run(name: str, **source) -> Path:
        cfg = make_cfg(tmp_path / "out", [], shard_size=20_000, val_tokens=10_000, **source)
        cfg.name = name
        return prepare(cfg)

    reference = run("local", source_paths=[str(local)])
    for name, folder, config in [("fineweb", fineweb, "sample-10BT"), ("json", json_dir, None)]:
        out = run(name, source_kind="hub", source_dataset=str(folder), source_config_name=config)
        check_output(out, docs, 20_000, 10_000)
        assert [p.read_bytes() for p in sorted(out.glob("*.bin"))] == [
            p.read_bytes() for p in sorted(reference.glob("*.bin"))
        ]
    with pytest.raises(ConfigError, match=r"no column 'body'; its columns are \['text', 'id'\]"):
        run(
            "body",
            source_kind="hub",
            source_dataset=str(fineweb),
            source_config_name="sample-10BT",
            source_text_column="body",
        )


def test_damaged_row_group_names_the_file(fineweb_sample: Path, tmp_path: Path):
    """A parquet file whose footer reads but whose second row group is garbage: the run stops
    with the file and row group named, keeping the shards it completed before."""
    path = tmp_path / "damaged.parquet"
    docs = sample_docs(fineweb_sample, 2 * sources.READ_BATCH)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=sources.READ_BATCH)
    second = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = second.dictionary_page_offset or second.data_page_offset
    with open(path, "r+b") as f:  # overwrite the row group's pages, keep the footer
        f.seek(start)
        f.write(b"\xff" * second.total_compressed_size)
    cfg = make_cfg(tmp_path / "out", [str(path)], shard_size=20_000, val_tokens=10_000)
    with pytest.raises(PrepareError, match=r"damaged.parquet: row group 1 cannot be read"):
        prepare(cfg)
    progress = json.loads((tmp_path / "out" / "sample" / PROGRESS).read_text())
    assert progress["shards"] and progress["documents"] <= sources.READ_BATCH  # work is recorded


@pytest.mark.parametrize(
    "values, first_bad, kind",
    [(["a", None, "c"], 1, "NoneType"), ([1, 2, 3], 0, "int")],
    ids=["null", "int"],
)
def test_values_that_are_not_text(tmp_path: Path, values: list, first_bad: int, kind: str):
    path = write_parquet(tmp_path / "x.parquet", {"text": values})
    pattern = f"document {first_bad} of the stream has {kind} in column 'text'"
    with pytest.raises(PrepareError, match=pattern):
        prepare(make_cfg(tmp_path / "out", [str(path)], val_tokens=0))


def test_shuffle_is_deterministic(fineweb_sample: Path, tmp_path: Path):
    def run(out: str, seed: int) -> Path:
        cfg = make_cfg(
            tmp_path / out,
            [str(fineweb_sample)],
            source_max_documents=NUM_DOCS,
            source_shuffle_buffer=1_000,
            source_shuffle_seed=seed,
        )
        return prepare(cfg)

    first, again, other = run("a", 1), run("b", 1), run("c", 2)
    assert folder_bytes(first) == folder_bytes(again)
    docs_first, docs_other = decode_stream(first), decode_stream(other)
    in_order = sample_docs(fineweb_sample)
    assert len(docs_first) == NUM_DOCS and docs_first != in_order[:NUM_DOCS]
    assert docs_first != docs_other
    assert set(docs_first) <= set(in_order) and len(set(docs_first)) == NUM_DOCS


# --------------------------------------------------------------------------- resume


def test_killed_run_resumes(fineweb_sample: Path, tmp_path: Path, capsys, monkeypatch):
    """SIGKILL a CLI run after its second recorded shard; the next run continues and ends with
    the bytes of an uninterrupted run, tokenizing only the documents not yet written."""
    shard_size = 200_000  # the whole sample (~4.6M tokens): ~23 shards, time to stop it midway
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.prepare",
        "source=local",
        f"source.paths=[{fineweb_sample}]",
        "source.name=sample",
        f"out_dir={killed}",
        f"shard_size={shard_size}",
        f"val_tokens={VAL_TOKENS}",
        "num_workers=1",
        "docs_per_task=16",
        "progress=false",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress_file = killed / "sample" / PROGRESS
    try:
        while proc.poll() is None:
            if (
                progress_file.is_file()
                and len(json.loads(progress_file.read_text())["shards"]) >= 2
            ):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:  # stopped by the SIGKILL above or by a failure here
            proc.kill()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out.decode()
    assert not (killed / "sample" / shards.MANIFEST).exists()
    recorded = json.loads(progress_file.read_text())
    assert recorded["documents"] > 0

    tok_batch = tok.tokenize_batch
    tokenized = []

    def counting(docs: list[str]) -> np.ndarray:
        tokenized.append(len(docs))
        return tok_batch(docs)

    monkeypatch.setattr(tok, "tokenize_batch", counting)
    cfg = make_cfg(killed, [str(fineweb_sample)], shard_size=shard_size)
    resumed = prepare(cfg)
    printed = capsys.readouterr().out
    assert f"skipping {recorded['documents']:,} documents" in printed
    total_docs = len(sample_docs(fineweb_sample))
    assert sum(tokenized) == total_docs - recorded["documents"]

    monkeypatch.setattr(tok, "tokenize_batch", tok_batch)
    uninterrupted = prepare(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    assert folder_bytes(resumed) == folder_bytes(uninterrupted)


def test_full_disk_keeps_completed_shards(fineweb_sample: Path, tmp_path: Path, monkeypatch):
    """ENOSPC while writing the fourth shard: an error that says so, three shards recorded,
    then a second run continues (from inside a document of the shuffled stream) to the
    uninterrupted bytes."""
    paths = [str(fineweb_sample)]
    cfg = make_cfg(
        tmp_path / "full",
        paths,
        source_max_documents=40,
        source_shuffle_buffer=100,
        shard_size=MIN_SHARD_SIZE,
        val_tokens=3_000,
    )
    whole = prepare(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    write_shard = shards.write_shard
    calls = []

    def failing(path, tokens):
        calls.append(path)
        if len(calls) == 4:
            Path(f"{path}.tmp").write_bytes(b"partial")  # as a killed write would leave it
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_shard(path, tokens)

    monkeypatch.setattr("pipeline.data.writer.write_shard", failing)
    with pytest.raises(PrepareError, match="disk is full") as info:
        prepare(cfg)
    assert "3 shards" in str(info.value) and "run the same command again" in str(info.value)
    folder = tmp_path / "full" / "sample"
    recorded = json.loads((folder / PROGRESS).read_text())
    assert len(recorded["shards"]) == 3 and recorded["doc_tokens_written"] > 0
    monkeypatch.setattr("pipeline.data.writer.write_shard", write_shard)

    damaged = folder / recorded["shards"][1]["file"]
    content = damaged.read_bytes()
    damaged.write_bytes(content[:3])
    with pytest.raises(PrepareError, match=f"{damaged} is missing or damaged"):
        prepare(cfg)
    damaged.write_bytes(content)
    older = {k: v for k, v in recorded.items() if k != "stream_order"}  # an earlier version's
    (folder / PROGRESS).write_text(json.dumps(older))
    with pytest.raises(PrepareError, match="stream_order: 1 -> 2 .an earlier version"):
        prepare(cfg)
    (folder / PROGRESS).write_text(json.dumps(recorded))
    assert folder_bytes(prepare(cfg)) == folder_bytes(whole)


def test_finished_run_changed_settings_and_overwrite(reference: Path, tmp_path: Path, capsys):
    manifest = json.loads((reference / shards.MANIFEST).read_text())
    paths = manifest["source"]["paths"]
    shutil.copytree(reference, tmp_path / reference.name)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / reference.name).iterdir()}
    cfg = make_cfg(tmp_path, paths, source_max_documents=NUM_DOCS)
    cfg.name = reference.name

    folder = prepare(cfg)
    assert f"{folder} is already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before

    changed = dataclasses.replace(cfg, shard_size=60_000)
    with pytest.raises(PrepareError, match="different settings") as info:
        prepare(changed)
    assert f"shard_size: {SHARD_SIZE} -> 60000" in str(info.value)
    assert "overwrite=true" in str(info.value)
    assert folder_bytes(folder) == folder_bytes(reference)

    prepare(dataclasses.replace(changed, overwrite=True))
    redone = shards.load_manifest(folder)
    assert redone["shard_size"] == 60_000
    assert redone["splits"]["train"]["documents"] + redone["splits"]["val"]["documents"] == (
        NUM_DOCS
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [s["file"] for s in redone["shards"]] + [shards.MANIFEST]
    )


# --------------------------------------------------------------------------- errors


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def no_match(d: Path) -> list[str]:
    return [str(d / "nothing_*.parquet")]


def parquet_without_text(d: Path) -> list[str]:
    return [str(write_parquet(d / "y.parquet", {"body": ["a", "b"]}))]


def second_parquet_without_text(d: Path) -> list[str]:
    return [str(d / "x.parquet"), str(write_parquet(d / "y.parquet", {"body": ["a"]}))]


def not_parquet(d: Path) -> list[str]:
    (d / "y.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return [str(d / "y.parquet")]


def jsonl_without_text(d: Path) -> list[str]:
    (d / "y.jsonl").write_text('{"body": "a"}\n')
    return [str(d / "y.jsonl")]


def csv_file(d: Path) -> list[str]:
    (d / "y.csv").write_text("text\na\n")
    return [str(d / "y.csv")]


def mixed_types(d: Path) -> list[str]:
    (d / "y.txt").write_text("a")
    return [str(d / "y.txt"), str(d / "x.parquet")]


@pytest.mark.parametrize(
    "setup, message",
    [
        (no_match, r"no file matches '.*nothing_\*\.parquet'"),
        (parquet_without_text, r"y.parquet has no column 'text'; its columns are \['body'\]"),
        (
            second_parquet_without_text,
            r"y.parquet has no column 'text'; its columns are \['body'\]",
        ),
        (not_parquet, r"y.parquet is not a readable parquet file"),
        (jsonl_without_text, r"y.jsonl has no column 'text'; its columns are \['body'\]"),
        (csv_file, r"y.csv: unknown file type"),
        (mixed_types, "mixes file types"),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_source_errors_before_any_work(tmp_path: Path, setup, message):
    write_parquet(tmp_path / "x.parquet", {"text": ["a", "b"]})
    with pytest.raises(ConfigError, match=message):
        prepare(make_cfg(tmp_path / "out", setup(tmp_path)))
    assert not (tmp_path / "out").exists()


def test_config_errors(fineweb_sample: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="source.kind='s3' is unknown"):
        prepare(make_cfg(tmp_path, [], source_kind="s3"))
    with pytest.raises(ConfigError, match="shard_size=0 must be >= 1,025 tokens") as info:
        prepare(make_cfg(tmp_path, [str(fineweb_sample)], shard_size=0, num_workers=-1))
    assert "num_workers=-1" in str(info.value)  # every problem at once
    with pytest.raises(ConfigError, match="plain folder name"):
        prepare(make_cfg(tmp_path, [str(fineweb_sample)], name="../elsewhere"))
    with pytest.raises(ConfigError, match="header stores the token count as int32"):
        prepare(make_cfg(tmp_path, [str(fineweb_sample)], shard_size=2**31))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory(fineweb_sample: Path, tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PrepareError, match=f"output directory {blocker / 'sample'} cannot be"):
        prepare(make_cfg(blocker, [str(fineweb_sample)], source_max_documents=5))


def test_not_enough_documents_for_training(fineweb_sample: Path, tmp_path: Path):
    cfg = make_cfg(tmp_path, [str(fineweb_sample)], source_max_documents=5)
    with pytest.raises(PrepareError, match="nothing is left for training"):
        prepare(cfg)


def test_token_ids_must_fit_uint16(tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="must fit uint16"):
        shards.write_shard(tmp_path / "x.bin", np.array([1, 2**16], dtype=np.int64))
    with pytest.raises(ValueError, match="must fit uint16"):
        shards.write_shard(tmp_path / "x.bin", np.array([-1, 5], dtype=np.int64))
    assert list(tmp_path.iterdir()) == []

    class WideTokenizer:  # a vocabulary larger than uint16 can hold
        def encode_to_numpy(self, text: str, **special) -> np.ndarray:
            return np.array([len(text), 70_000], dtype=np.uint32)

    monkeypatch.setattr(tok, "get_encoding", lambda: WideTokenizer())
    with pytest.raises(PrepareError, match="token id 70000 does not fit uint16"):
        tok.tokenize_batch(["abc"])


def test_tokenize_batch_prepends_eot(fineweb_sample: Path):
    """The ids are `encode_ordinary`'s, on edge cases and on real documents."""
    enc = tok.get_encoding()
    docs = ["Hello world", "", "<|endoftext|> is text here", *sample_docs(fineweb_sample, 300)]
    tokens = tok.tokenize_batch(docs)
    assert tokens.dtype == np.uint16
    expected = [t for d in docs for t in [tok.EOT, *enc.encode_ordinary(d)]]
    assert tokens.tolist() == expected
    assert [enc.decode(d[1:].tolist()) for d in tok.split_documents(tokens)] == docs


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "source", ["fineweb_sample_10bt", "fineweb_sample_100bt", "fineweb_edu_sample_10bt", "local"]
)
def test_source_configs_compose(source: str, monkeypatch):
    monkeypatch.setenv("FINEWEB_SAMPLE", "/data/sample.parquet")
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = to_dataclass(compose("prepare", overrides=[f"source={source}"]))
    assert isinstance(cfg, PrepareConfig) and cfg.problems() == []
    assert cfg.dataset_name == source
    if source == "local":
        assert cfg.source.paths == ["/data/sample.parquet"]
    else:
        assert cfg.source.kind == "hub" and cfg.source.config_name.startswith("sample-")


def test_command_line(reference: Path, fineweb_sample: Path, tmp_path: Path):
    """The Hydra entry point with overrides gives the reference bytes and leaves no Hydra
    folders; the local source's default path comes from $FINEWEB_SAMPLE."""
    env = {**os.environ, "FINEWEB_SAMPLE": str(fineweb_sample), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.prepare",
        "source=local",
        "source.name=sample",
        f"source.max_documents={NUM_DOCS}",
        "out_dir=out",
        f"shard_size={SHARD_SIZE}",
        f"val_tokens={VAL_TOKENS}",
        "num_workers=2",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prepared out/sample" in done.stdout and "tokens/s" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert folder_bytes(tmp_path / "out" / "sample") == folder_bytes(reference)

    bad = subprocess.run(
        cmd[:4] + ["source.paths=[nothing/*.parquet]"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no file matches 'nothing/*.parquet'" in bad.stderr
