"""Inputs a user can get wrong, provoked for real: shards too short for a window, a broken json
line or a text file that is not UTF-8 in prepare, an empty sampling prompt, a metrics.jsonl cut
off by a kill. Each is one line `error: ...` with exit code 2, or simply works, and nothing done
before is lost."""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers.proc import run_module
from helpers.tiny import small_config

from pipeline.config import PrepareConfig, SourceConfig
from pipeline.config.prepare import MIN_SHARD_SIZE
from pipeline.data import shards
from pipeline.data.loader import TrainLoader
from pipeline.data.progress import PROGRESS
from pipeline.data.sources import READ_BATCH, find_unreadable
from pipeline.data.tokenizer import EOT, get_encoding
from pipeline.data.writer import prepare
from pipeline.errors import ConfigError, PrepareError
from pipeline.evaluation.loading import load_for_eval
from pipeline.training.loop import train
from pipeline.training.runlog import METRICS

RESUME_NOTE = (
    "and run the same command again (prepare keeps the shards it completed and continues from them)"
)
FIX_LINE = "fix or delete that line"
BROKEN_LINE = '{"text": "The quick brown'  # a record cut off in the middle of its text


def fineweb_docs(path: Path, n: int) -> list[str]:
    """The first n FineWeb documents of the sample, cut to their first 600 characters (~130
    tokens): many short documents, since the stream reads READ_BATCH of them at a time."""
    return [d[:600] for d in pq.read_table(path, columns=["text"]).column("text").to_pylist()[:n]]


def prepare_cli(out_dir: Path, paths: list[Path], *extra: str):
    """`python -m pipeline.prepare` on local files, as a user runs it."""
    return run_module(
        "prepare",
        "source=local",
        "source.name=docs",
        f"source.paths=[{','.join(map(str, paths))}]",
        f"out_dir={out_dir}",
        f"shard_size={MIN_SHARD_SIZE}",
        "val_tokens=2000",
        "num_workers=1",
        "progress=false",
        *extra,
        timeout=120,
    )


def reference(out_dir: Path, paths: list[Path]) -> dict[str, bytes]:
    """Every file of an uninterrupted in-process run with prepare_cli's settings."""
    source = SourceConfig(name="docs", kind="local", paths=[str(p) for p in paths])
    cfg = PrepareConfig(
        source=source,
        out_dir=str(out_dir),
        shard_size=MIN_SHARD_SIZE,
        val_tokens=2000,
        num_workers=1,
        progress=False,
    )
    folder = prepare(cfg)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def recorded_shards(folder: Path) -> list[str]:
    """The completed shards `.progress.json` records, each checked on disk."""
    done = json.loads((folder / PROGRESS).read_text())["shards"]
    for shard in done:
        assert shards.read_num_tokens(folder / shard["file"]) == shard["tokens"]
    return [s["file"] for s in done]


# --------------------------------------------------------------------------- item 7: shard size


def test_shard_size_below_one_window_is_refused_before_anything_is_read(tmp_path):
    broken = tmp_path / "broken.jsonl"  # would fail if it were read
    broken.write_text(BROKEN_LINE + "\n")
    done = prepare_cli(tmp_path / "out", [broken], "shard_size=60")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: invalid configuration: shard_size=60 must be >= 1,025 tokens: a training window "
        "(block_size + 1 = 1,025 tokens for the GPT-2 presets) must fit inside one shard\n"
    )
    assert not (tmp_path / "out").exists()


def test_loader_names_the_shard_size_not_the_split(sample_shards):
    split = shards.open_split(sample_shards, "train")
    longest = max(len(s) for s in split.shards)
    assert split.num_tokens > 3 * longest  # plenty of tokens, in shards shorter than a window
    with pytest.raises(ConfigError) as info:
        TrainLoader(split, block_size=longest, micro_batch_size=1)
    assert info.value.problems == [
        f"the longest train shard holds {longest:,} tokens, fewer than one window of "
        f"block_size + 1 = {longest + 1:,} tokens (a window never spans two shards; "
        f"{len(split.shards)} shard(s), {split.num_tokens:,} tokens in all): prepare again with "
        f"shard_size >= {longest + 1:,}, or lower block_size"
    ]
    assert TrainLoader(split, block_size=longest - 1, micro_batch_size=1).samples_per_epoch > 0


# --------------------------------------------------------------------------- item 9: bad files


@pytest.mark.slow
def test_broken_json_line_names_the_file_and_line_and_the_fixed_file_continues(
    fineweb_sample, tmp_path
):
    """a.jsonl reads, b.jsonl has a record cut off on line 7: exit 2 naming that line, a's
    shards recorded; a repair that also changes what the run read of b is refused; fixing line 7
    alone continues the run to the bytes of an uninterrupted run."""
    docs = fineweb_docs(fineweb_sample, READ_BATCH + 60)
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:-12]))
    lines = [json.dumps({"text": d}) for d in docs[-12:]]
    bad.write_text("\n".join(lines[:6] + [BROKEN_LINE] + lines[6:]) + "\n")
    out = tmp_path / "out"

    done = prepare_cli(out, [good, bad])
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"error: {bad.resolve()}, line 7: not valid JSON (Unterminated string starting at "
        f"column 10): fix or delete that line {RESUME_NOTE}\n"
    )
    completed = recorded_shards(out / "docs")
    assert len(completed) >= 20  # the first READ_BATCH documents of a.jsonl, ~30k tokens

    fixed = "\n".join(lines) + "\n"  # line 7 deleted
    bad.write_text(fixed.replace(lines[1], json.dumps({"text": "changed"})))  # and line 2
    source = SourceConfig(name="docs", kind="local", paths=[str(good), str(bad)])
    changed = PrepareConfig(
        source=source,
        out_dir=str(out),
        shard_size=MIN_SHARD_SIZE,
        val_tokens=2000,
        num_workers=1,
        progress=False,
    )
    with pytest.raises(PrepareError, match="holds unfinished output of different settings"):
        prepare(changed)
    assert recorded_shards(out / "docs") == completed

    bad.write_text(fixed)
    done = prepare_cli(out, [good, bad])
    assert done.returncode == 0, done.stderr
    assert f"resuming {out / 'docs'}: {len(completed)} shards complete" in done.stdout
    assert folder_bytes(out / "docs") == reference(tmp_path / "ref", [good, bad])


@pytest.mark.slow
def test_text_file_not_utf8_names_the_byte_offset_and_the_fixed_file_continues(
    fineweb_sample, tmp_path
):
    """300 FineWeb documents as .txt files, then one in Latin-1: exit 2 naming the byte offset,
    the shards of the first READ_BATCH files recorded; saved as UTF-8, the same command
    finishes the run."""
    docs = fineweb_docs(fineweb_sample, 300)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"{i:03d}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    latin = "First line.\nLe café est fermé.\n"
    bad = tmp_path / "300.txt"
    bad.write_bytes(latin.encode("latin-1"))
    paths.append(bad)
    out = tmp_path / "out"

    done = prepare_cli(out, paths)
    assert done.returncode == 2, done.stderr
    offset = latin.encode("latin-1").index(b"\xe9")
    assert done.stderr == (
        f"error: {bad.resolve()}, byte offset {offset} (line 2): not UTF-8 (invalid "
        f"continuation byte): save it as UTF-8 {RESUME_NOTE}\n"
    )
    completed = recorded_shards(out / "docs")
    assert len(completed) >= 20

    bad.write_text(latin, encoding="utf-8")  # two bytes longer
    done = prepare_cli(out, paths)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out / 'docs'}: {len(completed)} shards complete" in done.stdout
    assert folder_bytes(out / "docs") == reference(tmp_path / "ref", paths)


@pytest.mark.parametrize(
    "name, content, found",
    [
        ("ok.jsonl", b'{"text": "a"}\n\n  \n{"text": "b"} {"text": NaN}\r\n', None),
        (
            "list.jsonl",
            b'{"text": "a"}\n[1, 2]\n',
            f"line 2: a JSON list, not an object {{...}}: {FIX_LINE}",
        ),
        (
            "latin.jsonl.gz",
            b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n',
            f"line 3: not UTF-8 (invalid continuation byte at byte offset 41): {FIX_LINE}",
        ),
        (
            "array.json",
            b'[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n',
            "line 4: not valid JSON (Expecting ',' delimiter at column 3): fix the file",
        ),
    ],
)
def test_the_scan_names_what_the_json_reader_cannot_read(tmp_path, name, content, found):
    """Only the place pyarrow's reader also fails on: blank lines, several objects on a line
    and NaN read; the offset of a .gz file counts decompressed bytes."""
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)
    error = find_unreadable([path])
    assert (error and str(error)) == (found and f"{path}, {found} {RESUME_NOTE}")


# --------------------------------------------------------------------------- item 11: no prompt


@pytest.fixture(scope="module")
def run_dir(sample_shards, tmp_path_factory) -> Path:
    """A tiny GPT-2 trained for 6 steps (checkpoints at 3 and 6, validation at 3 and 6)."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = small_config(sample_shards, runs, eval_tokens=1024)
    cfg.optim.schedule = "wsd"  # decays over step 6 alone: a checkpoint of step 3 can extend
    train(cfg)
    return runs / "run"


def test_empty_prompt_samples_from_end_of_text(run_dir):
    done = run_module(
        "sample",
        f"checkpoint={run_dir}",
        "prompt=''",
        "max_new_tokens=8",
        "temperature=0",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    model = load_for_eval(str(run_dir)).model.eval()
    ids = model.generate(torch.tensor([[EOT]]), 8, temperature=0)[0, 1:].tolist()
    assert done.stdout == get_encoding().decode(ids) + "\n"  # the continuation alone
    assert not done.stdout.startswith("<|endoftext|>")


def test_hellaswag_ending_longer_than_the_block_size_is_one_line(run_dir, shared_data):
    """The tiny model's block_size is 64; some HellaSwag endings take more tokens."""
    path = shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl"
    enc = get_encoding()
    first = next(
        i
        for i, line in enumerate(path.read_text().splitlines())
        if max(len(enc.encode_ordinary(" " + e)) for e in json.loads(line)["endings"]) >= 65
    )
    done = run_module(
        "evaluate",
        f"checkpoint={run_dir}",
        "tasks=[hellaswag]",
        f"hellaswag_path={path}",
        "sample_tokens=0",
        timeout=180,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: HellaSwag item {first}: an ending of ")
    assert "does not fit the model's block_size 64 with one token of context" in done.stderr
    assert done.stderr.endswith("(evaluate: tasks=[val_loss]; training: eval.hellaswag_items=0)\n")


# --------------------------------------------------------------------------- item 12: cut metrics


def cut_last_line(path: Path) -> list[str]:
    """Cut the last record in half, as a kill while writing it would; returns the complete
    lines before it."""
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    return lines[:-1]


def test_readers_take_the_complete_lines_of_a_cut_metrics_file(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    complete = [json.loads(line) for line in cut_last_line(run / METRICS)]

    done = run_module("plot", str(run), "--out", str(tmp_path / "x.png"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {tmp_path / 'x.png'} (1 run(s))\n"
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")

    done = run_module(
        "plan",
        "cost",
        "--tokens",
        "1e9",
        "--metrics",
        str(run / METRICS),
        "--skip-first",
        "1",
        "--gpus",
        "1",
        "--price",
        "2",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rates = [r["tokens_per_s"] for r in complete if r["kind"] == "train"][1:]
    assert len(rates) >= 4
    assert done.stdout.startswith(
        f"measured throughput: {statistics.median(rates):,.0f} tokens/s (median of "
    )


def test_resumed_run_drops_the_cut_line_and_repeats_no_record(run_dir, sample_shards, tmp_path):
    """Killed while writing after step 6, before its checkpoint: run again with more steps, it
    resumes from step 3 and ends at step 8 with every complete record once and no fragment."""
    shutil.copytree(run_dir, tmp_path / "run")
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    complete = cut_last_line(run / METRICS)
    cfg = small_config(sample_shards, tmp_path, eval_tokens=1024, max_steps=8, resume="auto")
    cfg.optim.schedule = "wsd"
    train(cfg)

    lines = (run / METRICS).read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    rows = [json.loads(line) for line in lines]  # no fragment
    kept = [line.rstrip("\n") for line in lines if json.loads(line)["step"] <= 3]
    assert kept == [line for line in complete if json.loads(line)["step"] <= 3]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))  # every record once
    assert [s for k, s in keys if k == "train"] == list(range(1, 9))
