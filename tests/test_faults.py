"""Fault tolerance: real training processes killed, preempted, poisoned with NaN, or short of
disk, and runs resumed from what they left; bad data and checkpoints refused clearly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO
from helpers.proc import command, wait_until
from helpers.runs import assert_identical, final_weights, records, weights
from helpers.tiny import tiny_run, train_config

import pipeline.training.checkpoint.folder
import pipeline.training.checkpoint.tensors
from pipeline.data.shards import HEADER_BYTES
from pipeline.errors import PREEMPTED, NumericsError, ShardError
from pipeline.training.checkpoint.folder import list_checkpoints
from pipeline.training.loop import train


def overrides(shard_dir: Path, runs_dir: Path, run_name: str = "run") -> list[str]:
    """A 2-layer model, 6 steps of 512 tokens (2 accumulation steps), checkpoints every 2."""
    return tiny_run(
        shard_dir,
        runs_dir,
        run_name,
        "trainer.max_steps=6",
        "eval.interval=2",
        "eval.tokens=1024",
        "checkpoint.interval=2",
        "checkpoint.keep_last=10",
        "trainer.seed=5",
    )


@pytest.fixture(scope="module")
def reference(sample_shards, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    runs = tmp_path_factory.mktemp("reference")
    subprocess.run(
        command("train", *overrides(sample_shards, runs)), cwd=REPO, check=True, capture_output=True
    )
    return runs / "run"


@pytest.mark.parametrize(
    "fault",
    [
        # gradients computed, optimizer not stepped
        pytest.param("backward:3", marks=pytest.mark.slow),
        # weights updated, step 4 neither logged nor saved: resumes as backward:3 does
        pytest.param("optimizer:4", marks=pytest.mark.slow),
        "checkpoint:4",  # the tensors of checkpoint 4 written, not rng.pt and state.json
        # the last step done, its checkpoint not written: optimizer:4's kill point again
        pytest.param("optimizer:6", marks=pytest.mark.slow),
    ],
)
def test_killed_run_resumes_to_the_same_weights(sample_shards, reference, tmp_path, fault):
    args = overrides(sample_shards, tmp_path)
    env = {**os.environ, "PIPELINE_FAULT": fault}
    killed = subprocess.run(command("train", *args), cwd=REPO, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    if fault == "checkpoint:4":
        assert (tmp_path / "run" / "checkpoints" / ".step_0000004.tmp" / ".metadata").is_file()
    subprocess.run(command("train", *args), cwd=REPO, check=True, capture_output=True)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))
    assert_identical(tmp_path / "run", reference)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_for_a_restart(sample_shards, reference, tmp_path):
    args = overrides(sample_shards, tmp_path) + ["checkpoint.interval=0"]
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = subprocess.Popen(command("train", *args), cwd=REPO, stdout=subprocess.PIPE, text=True)
    wait_until(process, lambda: metrics.exists() and '"kind": "train"' in metrics.read_text(), 120)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED, out
    stopped_at = json.loads((list_checkpoints(tmp_path / "run")[-1] / "state.json").read_text())
    assert 1 <= stopped_at["step"] < 6 and "stopping after step" in out
    resumed = subprocess.run(command("train", *args), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert records(tmp_path / "run", "train") == records(reference, "train")
    final, expected = final_weights(tmp_path / "run"), final_weights(reference)
    assert all(torch.equal(final[k], expected[k]) for k in final)
    # a finished run started again exits at once, successfully
    again = subprocess.run(command("train", *args), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_sigterm_while_a_checkpoint_is_written_completes_it_before_exiting(
    sample_shards, reference, tmp_path
):
    """Checkpoint 2 is still being written (stalled 3 s, a slow disk) when SIGTERM arrives at
    step 3: the run completes it, writes the preemption checkpoint, exits 75, and resumes to
    the uninterrupted run's result."""
    args = overrides(sample_shards, tmp_path)
    env = {**os.environ, "PIPELINE_FAULT": "stall:2"}
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = subprocess.Popen(
        command("train", *args), cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    wait_until(process, lambda: metrics.exists() and '"step": 3' in metrics.read_text(), 120)
    assert not list_checkpoints(tmp_path / "run")  # checkpoint 2 is in flight
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED, out
    steps = [
        json.loads((p / "state.json").read_text())["step"]
        for p in list_checkpoints(tmp_path / "run")
    ]
    assert steps[0] == 2 and 3 <= steps[-1] < 6, steps
    assert out.index("step_0000002") < out.index("stopping after step")
    subprocess.run(command("train", *args), cwd=REPO, check=True, capture_output=True)
    assert_identical(tmp_path / "run", reference)


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous(sample_shards, reference, tmp_path):
    shutil.copytree(reference, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000006")
    tensors = checkpoints / "step_0000004" / "__0_0.distcp"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    tensors.write_bytes(bytes(data))
    summary = train(train_config(overrides(sample_shards, tmp_path)))
    assert summary["steps"] == 6
    assert_identical(tmp_path / "run", reference)


def test_truncated_checkpoint_is_reported_and_skipped(sample_shards, reference, tmp_path, capsys):
    shutil.copytree(reference, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000006")
    with open(checkpoints / "step_0000004" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    train(train_config(overrides(sample_shards, tmp_path)))
    assert "skipping checkpoint" in capsys.readouterr().out
    assert_identical(tmp_path / "run", reference)


def test_rotation_keeps_the_newest_and_the_best(sample_shards, tmp_path):
    every_step = ["checkpoint.keep_last=1", "checkpoint.interval=1", "eval.interval=1"]
    args = overrides(sample_shards, tmp_path) + every_step
    train(train_config(args))
    kept = list_checkpoints(tmp_path / "run")
    val = {r["step"]: r["loss"] for r in records(tmp_path / "run", "val")}
    best = min((loss, step) for step, loss in val.items() if step > 0)[1]
    assert [p.name for p in kept] == sorted({f"step_{best:07d}", "step_0000006"})


def test_non_finite_step_is_skipped_and_the_run_goes_on(sample_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULT", "nan:3")
    train(train_config(overrides(sample_shards, tmp_path) + ["checkpoint.interval=1"]))
    skipped = records(tmp_path / "run", "skip")
    assert [r["step"] for r in skipped] == [3]
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 4, 5, 6]
    ckpt = tmp_path / "run" / "checkpoints"
    before, after = weights(ckpt / "step_0000002"), weights(ckpt / "step_0000003")
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at step 3


def test_repeated_non_finite_steps_stop_with_the_last_good_weights(
    sample_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("PIPELINE_FAULT", "nan:2-6")
    args = overrides(sample_shards, tmp_path) + ["trainer.max_bad_steps=3", "checkpoint.interval=1"]
    with pytest.raises(NumericsError, match="3 steps in a row"):
        train(train_config(args))
    ckpt = tmp_path / "run" / "checkpoints"
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_0000004"
    good, last = weights(ckpt / "step_0000001"), weights(ckpt / "step_0000004")
    assert all(torch.equal(good[k], last[k]) for k in good)


def test_disk_full_while_checkpointing_keeps_the_previous_one(
    sample_shards, reference, tmp_path, monkeypatch
):
    """The tensors of step 4 fail to write (in DCP's background writer, as a full disk would):
    the run stops with one line once it learns of it, step 4 leaves nothing behind, and the
    same command continues from step 2 to the uninterrupted run's result."""
    real_writer = pipeline.training.checkpoint.tensors.FileSystemWriter

    class FullDisk(real_writer):
        def write_data(self, plan, planner):
            if "step_0000004" in str(self.path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_data(plan, planner)

    monkeypatch.setattr(pipeline.training.checkpoint.tensors, "FileSystemWriter", FullDisk)
    with pytest.raises(OSError, match="disk is full.*earlier checkpoints are intact"):
        train(train_config(overrides(sample_shards, tmp_path)))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))
    monkeypatch.setattr(pipeline.training.checkpoint.tensors, "FileSystemWriter", real_writer)
    train(train_config(overrides(sample_shards, tmp_path)))
    assert_identical(tmp_path / "run", reference)


@pytest.fixture
def shard_copy(sample_shards, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(sample_shards, copy)
    return copy


def test_out_of_range_token_ids_are_refused_naming_the_shard(shard_copy, tmp_path):
    for shard in shard_copy.glob("*_train_*.bin"):
        with open(shard, "r+b") as f:  # same size and header: only the contents are wrong
            f.seek(HEADER_BYTES)
            f.write(b"\x60\xea" * 1000)  # token id 60000 >= vocab_size 50257
    with pytest.raises(ShardError, match=r"_train_\d+\.bin: token id 60000"):
        train(train_config(overrides(shard_copy, tmp_path)))
    with pytest.raises(ShardError, match="sha256"):  # found before training when asked
        train(train_config(overrides(shard_copy, tmp_path) + ["data.verify_checksums=true"]))


def test_manifest_of_another_tokenizer_is_refused(shard_copy, tmp_path):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["tokenizer"] = "cl100k_base"
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="cl100k_base"):
        train(train_config(overrides(shard_copy, tmp_path)))
    assert not (tmp_path / "run").exists()


def test_command_line_errors_exit_with_the_no_restart_code(sample_shards, tmp_path):
    args = overrides(sample_shards, tmp_path) + ["trainer.tokens_per_step=500"]
    done = subprocess.run(command("train", *args), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "tokens_per_step=500" in done.stderr
