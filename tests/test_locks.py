"""One process per run folder and per prepare output: a second one, started on a folder a live
process holds, refuses with one line and exit code 2 naming that process, and writes nothing;
a lock left by a killed process never blocks a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.env import process_env
from helpers.paths import REPO
from helpers.proc import command, run_module, sigint_as_at_a_terminal
from helpers.tiny import tiny_run

from pipeline.errors import INTERRUPTED, USER_ERROR, FolderLockedError
from pipeline.files import LOCK, folder_lock
from pipeline.training.runlog import read_records

HOLDER = f"process {os.getpid()} on {socket.gethostname()}"


def held_message(what: str, folder: Path, instead: str, holder: str = HOLDER) -> str:
    return (
        f"error: {what} {folder} is in use by {holder} (it holds {folder / LOCK}): wait for "
        f"that process to finish or stop it, then run the same command again; or choose "
        f"another {instead}\n"
    )


def train_args(shards: Path, runs: Path, *settings: str) -> list[str]:
    return tiny_run(shards, runs, "run", "eval.tokens=1024", "eval.interval=0", *settings)


def test_lock_is_exclusive_released_and_leaves_nothing(tmp_path):
    folder = tmp_path / "runs" / "run"
    with folder_lock(folder, "run run: its folder", "trainer.run_name") as held:
        assert held == folder and (folder / LOCK).read_text().split()[0] == f"pid={os.getpid()}"
        with pytest.raises(FolderLockedError) as info:  # another holder, even in this process
            with folder_lock(folder, "run run: its folder", "trainer.run_name"):
                pass
        assert info.value.exit_code == USER_ERROR
        assert f"error: {info.value}\n" == held_message(
            "run run: its folder", folder, "trainer.run_name"
        )
    assert not folder.exists() and (tmp_path / "runs").is_dir()  # created empty: removed
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("kept\n")
    with folder_lock(folder, "x", "y"):
        pass
    assert [p.name for p in folder.iterdir()] == ["metrics.jsonl"]


def test_a_lock_of_a_killed_process_does_not_block(tmp_path):
    code = (
        "import sys, time; from pipeline.files import folder_lock\n"
        "with folder_lock(sys.argv[1], 'x', 'y'):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=process_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderLockedError, match=f"process {holder.pid} on "):
            with folder_lock(tmp_path, "x", "y"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK).is_file()  # left behind by the killed holder
    with folder_lock(tmp_path, "x", "y"):  # the OS released its flock
        pass


def test_second_training_on_a_live_run_is_refused(sample_shards, tmp_path):
    """Two real trainings with one run_name: the second exits 2 naming the first, which goes on
    undisturbed (its metrics not interleaved) until it is interrupted."""
    args = train_args(sample_shards, tmp_path, "trainer.max_steps=500", "checkpoint.interval=0")
    first = subprocess.Popen(
        command("train", *args),
        cwd=REPO,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_at_a_terminal,
    )
    run = tmp_path / "run"
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and read_records(run, "train")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        recorded = (run / ".hydra" / "overrides.yaml").read_text()
        second = run_module("train", *args, "trainer.max_steps=7", timeout=180)
        assert second.returncode == USER_ERROR, second.stderr
        holder = f"process {first.pid} on {socket.gethostname()}"
        assert second.stderr == held_message(
            "run run: its folder", run, "trainer.run_name or trainer.runs_dir", holder
        )
        assert first.poll() is None  # the first run is still training
        assert (run / ".hydra" / "overrides.yaml").read_text() == recorded  # its config kept
    finally:
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == INTERRUPTED, err
    steps = [r["step"] for r in read_records(run, "train")]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, each once
    assert not (run / LOCK).exists()


def test_second_prepare_into_a_held_output_is_refused(fineweb_sample, tmp_path):
    out = tmp_path / "out" / "sample"
    with folder_lock(out, "prepare output", "name or out_dir"):
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
        assert done.stderr == held_message("prepare output", Path("out/sample"), "name or out_dir")
        assert [p.name for p in out.iterdir()] == [LOCK]  # nothing written
