"""Outputs that cannot be written: a disk that fills up (a real small tmpfs where this process
may mount one, else the failure injected at the writer) and a file standing where an output
folder must be. Each is one line and exit code 2, leaves no partial file, and keeps what was
complete, so the same command continues once the cause is fixed."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.proc import run_module
from helpers.tiny import tiny_run, train_config

import pipeline.training.checkpoint.folder
from pipeline.errors import USER_ERROR, OutputError, one_line
from pipeline.training.checkpoint.folder import list_checkpoints, read_state, verify_checksums
from pipeline.training.loop import train

CHECKPOINT_BYTES = 19_910_547  # the tiny run's checkpoint: DCP tensors and index, RNG, state.json


class SmallDisk:
    """A tmpfs mounted at `path`, resized with `resize`."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    """A 2 MiB tmpfs (skipped where mounting is not permitted), always unmounted."""
    where = tmp_path / "disk"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallDisk(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def train_args(shards: Path, runs: Path, *settings: str) -> list[str]:
    return tiny_run(
        shards,
        runs,
        "run",
        "eval.interval=0",
        "eval.tokens=1024",
        "checkpoint.interval=1",
        "checkpoint.keep_last=1",
        *settings,
    )


@pytest.fixture(scope="module")
def checkpointed(sample_shards, tmp_path_factory) -> Path:
    """A run of one step with its checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    train(train_config(train_args(sample_shards, runs, "trainer.max_steps=1")))
    return runs / "run"


# --------------------------------------------------------------------------- a full disk


def test_disk_full_while_checkpointing(sample_shards, small_disk):
    """Room for one checkpoint, not two: the second fails in torch's zip writer (RuntimeError
    "unexpected pos"); the first stays whole and the run continues from it."""
    small_disk.resize(f"{CHECKPOINT_BYTES * 3 // 2}")
    args = train_args(sample_shards, small_disk.path, "trainer.max_steps=3")
    done = run_module("train", *args, timeout=300)
    run = small_disk.path / "run"
    step2 = run / "checkpoints" / "step_0000002"
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr.startswith(f"error: writing {step2} failed: the disk is full (")
    assert done.stderr.endswith(
        "; no partial checkpoint is left and earlier checkpoints are intact: free disk space "
        "and run the same command again (it resumes from the newest checkpoint)\n"
    )
    assert done.stderr.count("\n") == 1
    assert [p.name for p in list_checkpoints(run)] == ["step_0000001"]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    first = list_checkpoints(run)[0]
    verify_checksums(first, read_state(first))
    small_disk.resize(f"{CHECKPOINT_BYTES * 4}")  # keep_last and the best
    again = run_module("train", *args, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {first}" in again.stdout
    assert list_checkpoints(run)[-1].name == "step_0000003"


@pytest.mark.slow
def test_disk_full_while_appending_metrics_keeps_complete_records(sample_shards, small_disk):
    """32 KiB left, no checkpoints: metrics.jsonl fills the disk after some steps; it keeps
    only whole records (the part of the record being written is cut off again)."""
    (small_disk.path / "filler").write_bytes(b"x" * (2 * 1024 * 1024 - 32 * 1024))
    args = train_args(
        sample_shards, small_disk.path, "trainer.max_steps=400", "checkpoint.interval=0"
    )
    done = run_module("train", *args, timeout=300)
    metrics = small_disk.path / "run" / "metrics.jsonl"
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr.startswith(f"error: writing {metrics} failed: the disk is full (")
    assert done.stderr.endswith(
        "; metrics.jsonl keeps its complete records and the checkpoints are intact: free disk "
        "space and run the same command again (it resumes from the newest checkpoint, or "
        "starts again when the run has none)\n"
    )
    text = metrics.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert 10 < len(steps) < 400 and steps == list(range(1, len(steps) + 1))


def test_disk_full_while_writing_shards(fineweb_sample, small_disk, tmp_path):
    args = [
        "prepare",
        "source=local",
        f"source.paths=[{fineweb_sample}]",
        "source.name=sample",
        "source.max_documents=2000",
        f"out_dir={small_disk.path}",
        "shard_size=100000",
        "val_tokens=100000",
        "num_workers=1",
        "progress=false",
    ]
    done = run_module(*args, timeout=300)
    out = small_disk.path / "sample"
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr.startswith("error: the disk is full: writing ")
    assert "are complete and recorded in" in done.stderr and done.stderr.count("\n") == 1
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    complete = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert complete
    small_disk.resize("16m")
    again = run_module(*args, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    assert all((out / name).read_bytes() == data for name, data in complete.items())


def test_disk_full_while_exporting(checkpointed, small_disk):
    out = small_disk.path / "hf"
    done = run_module("export", "checkpoint", str(checkpointed), str(out), timeout=120)
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr.startswith(f"error: writing {out} failed: the disk is full (")
    assert done.stderr.endswith(
        f"; no partial file is left and {out} holds what it held before: free disk space and "
        "run the export again\n"
    )
    assert list(out.iterdir()) == []


def test_zip_writer_failure_is_one_line_and_keeps_the_previous_checkpoint(
    sample_shards, tmp_path, monkeypatch
):
    """Without a mount: torch.save fails as on a full disk while checkpoint 2 is written."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_0000002" in str(getattr(f, "name", f)):
            f.write(b"partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(pipeline.training.checkpoint.folder.torch, "save", full_disk)
    with pytest.raises(OutputError) as info:
        train(train_config(train_args(sample_shards, tmp_path, "trainer.max_steps=3")))
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert info.value.exit_code == USER_ERROR
    assert one_line(info.value) == (
        f"writing {step2} failed: the disk is full ([enforce fail at inline_container.cc:672] . "
        "unexpected pos 704 vs 598); no partial checkpoint is left and earlier checkpoints are "
        "intact: free disk space and run the same command again (it resumes from the newest "
        "checkpoint)"
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000001"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


# --------------------------------------------------------------------------- a file in the way


def test_runs_dir_or_run_folder_that_is_a_file(sample_shards, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine\n")
    done = run_module("train", *train_args(sample_shards, blocker), timeout=120)
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr == (
        f"error: run run: its folder {blocker / 'run'} cannot be created: {blocker} is a file, "
        "not a folder: move or delete it, or choose another trainer.run_name or "
        "trainer.runs_dir\n"
    )
    with pytest.raises(OutputError, match=f"{blocker} is a file, not a folder"):
        train(train_config(tiny_run(sample_shards, tmp_path, "a_file")))  # the run folder
    assert blocker.read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.parametrize("where", ["out_dir", "output folder"])
def test_prepare_output_that_is_a_file(fineweb_sample, tmp_path, where):
    blocker = tmp_path / "out" if where == "out_dir" else tmp_path / "out" / "sample"
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("mine\n")
    done = run_module(
        "prepare",
        "source=local",
        f"source.paths=[{fineweb_sample}]",
        "source.name=sample",
        "source.max_documents=50",
        "out_dir=out",
        "num_workers=1",
        "progress=false",
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr.startswith("error: output directory out/sample cannot be written (")
    assert done.stderr.endswith("choose another out_dir, or fix the path or its permissions\n")
    assert blocker.read_text() == "mine\n"
    assert sorted(tmp_path.rglob("*")) == sorted({tmp_path / "out", blocker})  # nothing new


def test_hf_export_folder_that_is_a_file(checkpointed, tmp_path):
    blocker = tmp_path / "export"
    blocker.write_text("mine\n")
    done = run_module("export", "checkpoint", str(checkpointed), str(blocker), timeout=120)
    assert done.returncode == USER_ERROR, done.stderr
    assert done.stderr == (
        f"error: export folder {blocker} cannot be created: {blocker} is a file, not a folder: "
        "move or delete it, or choose another OUT_DIR\n"
    )
    assert blocker.read_text() == "mine\n" and [p.name for p in tmp_path.iterdir()] == ["export"]
