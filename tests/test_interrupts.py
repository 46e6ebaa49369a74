"""Ctrl-C in a stage: one line, exit code 130, no traceback (from any process: prepare's worker
processes too), and what was complete stays, so the same command continues.

Ctrl-C at a terminal sends SIGINT to the whole foreground process group; each stage runs here in
its own process group and gets SIGINT the same way (os.killpg)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.env import process_env
from helpers.proc import command, run_module, sigint_as_at_a_terminal
from helpers.tiny import tiny_run

from pipeline.config import PrepareConfig, SourceConfig
from pipeline.data.progress import Progress
from pipeline.data.writer import prepare
from pipeline.errors import INTERRUPTED, INTERRUPTED_MESSAGE
from pipeline.training.checkpoint.folder import list_checkpoints, read_state, verify_checksums
from pipeline.training.runlog import read_records


def interrupt_when(args: list[str], ready: Callable[[], bool], cwd: Path) -> tuple[int, str, str]:
    """Start `python -m pipeline.<args>` in its own process group, send the group SIGINT once
    ready() holds, and return (exit code, stdout, stderr)."""
    process = subprocess.Popen(
        command(*args),
        cwd=cwd,
        env=process_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=sigint_as_at_a_terminal,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_ctrl_c_in_training_keeps_complete_checkpoints_and_resumes(sample_shards, tmp_path):
    args = tiny_run(
        sample_shards,
        tmp_path,
        "run",
        "trainer.max_steps=6",
        "eval.interval=0",
        "eval.tokens=1024",
        "checkpoint.interval=1",
        "checkpoint.keep_last=20",
    )
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    code, out, err = interrupt_when(
        ["train", *args], lambda: (checkpoints / "step_0000002").is_dir(), tmp_path
    )
    assert (code, err) == (INTERRUPTED, INTERRUPTED_MESSAGE + "\n"), out + err
    kept = list_checkpoints(run)
    assert 2 <= len(kept) < 6 and not list(checkpoints.glob(".*.tmp"))
    for path in kept:  # every complete checkpoint is whole
        verify_checksums(path, read_state(path))
    again = run_module("train", *args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {kept[-1]}" in again.stdout
    steps = [r["step"] for r in read_records(run, "train")]
    assert steps == list(range(1, 7))  # each step once, in order


def prepare_args(fineweb_sample: Path, name: str, workers: int) -> list[str]:
    return [
        "prepare",
        "source=local",
        f"source.paths=[{fineweb_sample}]",
        "source.name=sample",
        "source.max_documents=600",
        f"name={name}",
        "out_dir=out",
        "shard_size=5000",
        "val_tokens=5000",
        f"num_workers={workers}",
        "docs_per_task=8",
        "progress=false",
    ]


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_ctrl_c_in_prepare_keeps_completed_shards_and_continues(fineweb_sample, tmp_path, workers):
    out = tmp_path / "out" / "sample"

    def shards_recorded() -> bool:
        try:
            return len(Progress.load(out).shards) >= 3
        except Exception:  # not written yet
            return False

    args = prepare_args(fineweb_sample, "sample", workers)
    code, _, err = interrupt_when(args, shards_recorded, tmp_path)
    assert (code, err) == (INTERRUPTED, INTERRUPTED_MESSAGE + "\n")  # workers stay quiet
    recorded = Progress.load(out).shards
    assert recorded and all((out / s["file"]).is_file() for s in recorded)
    assert "manifest.json" not in os.listdir(out)
    again = run_module(*args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming out/sample: {len(recorded)} shards complete" in again.stdout

    reference = prepare(
        PrepareConfig(
            source=SourceConfig(
                name="sample", kind="local", paths=[str(fineweb_sample)], max_documents=600
            ),
            out_dir=str(tmp_path / "reference"),
            shard_size=5000,
            val_tokens=5000,
            num_workers=1,
            progress=False,
        )
    )
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    assert all((out / n).read_bytes() == (reference / n).read_bytes() for n in os.listdir(out))
