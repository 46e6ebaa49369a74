"""Checkpoints mirrored off the machine (checkpoint.mirror), against real storage: a local
folder, and an S3 server (moto's, started here) through s3fs. A run whose machine is lost (its
runs/ deleted) continues from the mirror to the weights of the uninterrupted run, bit for bit;
a partial upload (a SIGKILL in the middle of one) is never pulled and is cleaned up by the next
upload; a failing mirror never stops training; a URL no file system handles is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.env import process_env
from helpers.paths import REPO
from helpers.proc import command, run_module, wait_until
from helpers.runs import final_weights
from helpers.tiny import tiny_run, train_config

from pipeline.errors import PREEMPTED, USER_ERROR
from pipeline.files import sha256_file
from pipeline.training.checkpoint.folder import STATE, checkpoint_dir, list_checkpoints
from pipeline.training.checkpoint.mirror import Mirror
from pipeline.training.loop import train

SETTINGS = ("trainer.max_steps=4", "checkpoint.interval=2", "eval.tokens=0", "trainer.seed=7")
"""4 steps, checkpoints at 2 and 4, no validation."""
BUCKET = "mirror-test"


def overrides(shards: Path, runs: Path, *extra: str) -> list[str]:
    return tiny_run(shards, runs, "run", *SETTINGS, *extra)


@pytest.fixture(scope="module")
def reference(sample_shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the run without a mirror, never interrupted."""
    runs = tmp_path_factory.mktemp("reference")
    train(train_config(overrides(sample_shards, runs)))
    return final_weights(runs / "run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """An S3 server on 127.0.0.1 (moto), its bucket made; the environment that points s3fs at
    it, for the training processes."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the s3fs of this process (the test's own reads)
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def mirror_url(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "mirror") if kind == "folder" else f"s3://{BUCKET}/{tmp_path.name}"


def mirrored(url: str, run_dir: Path) -> Mirror:
    return Mirror(url, run_dir, run_dir.name, keep_last=1, say=print)


@pytest.mark.parametrize("kind", ["folder", pytest.param("s3", marks=pytest.mark.slow)])
def test_a_lost_machine_continues_from_the_mirror(
    kind, reference, sample_shards, tmp_path, request
):
    """Train with a mirror (keeping 2 checkpoints), lose runs/, and find the mirror's step 4
    partial (its state.json gone, as an upload killed with the machine leaves it): the run
    pulls step 2, checks it, continues to the uninterrupted run's weights, and uploads a
    complete step 4 in place of the partial one."""
    env = request.getfixturevalue("s3_env") if kind == "s3" else {}
    url, runs = mirror_url(kind, tmp_path), tmp_path / "runs"
    args = overrides(sample_shards, runs, f"checkpoint.mirror={url}", "checkpoint.keep_last=2")
    first = run_module("train", *args, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    mirror = mirrored(url, runs / "run")
    remote = mirror.remote()
    assert sorted(remote) == [2, 4]
    for path in list_checkpoints(runs / "run"):  # the same bytes as the local checkpoints
        step = json.loads((path / STATE).read_text())["step"]
        for name, meta in remote[step]["files"].items():
            assert meta["sha256"] == sha256_file(path / name), name
    shutil.rmtree(runs)  # the machine is lost
    mirror.fs.rm(f"{mirror.folder}/step_0000004/{STATE}")
    assert sorted(mirror.remote()) == [2]

    again = run_module("train", *args, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    step2 = checkpoint_dir(runs / "run", 2)
    assert f"pulled checkpoint {mirror.where}/step_0000002 -> {step2}" in again.stdout
    assert f"resuming from {step2}" in again.stdout
    resumed = final_weights(runs / "run")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert sorted(mirror.remote()) == [2, 4]
    local4 = checkpoint_dir(runs / "run", 4)
    assert mirror.remote()[4]["files"] == json.loads((local4 / STATE).read_text())["files"]


def test_a_kill_during_an_upload_leaves_nothing_to_pull(reference, sample_shards, tmp_path):
    """SIGKILL after the first file of step 2's upload: the mirror holds a step folder without
    state.json, which no pull sees; the same command again resumes from the local step 2,
    finishes as the uninterrupted run, and its upload replaces the partial folder."""
    url, runs = str(tmp_path / "mirror"), tmp_path / "runs"
    args = overrides(sample_shards, runs, f"checkpoint.mirror={url}")
    killed = run_module("train", *args, env={"PIPELINE_FAULT": "mirror:2"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = tmp_path / "mirror" / "checkpoints" / "run" / "step_0000002"
    assert partial.is_dir() and len(list(partial.iterdir())) == 1
    assert not (partial / STATE).exists()
    mirror = mirrored(url, runs / "run")
    assert mirror.remote() == {}
    assert mirror.pull() is None  # the local step 2 is complete and nothing mirrored is newer
    again = run_module("train", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "pulled checkpoint" not in again.stdout
    resumed = final_weights(runs / "run")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    remote = mirror.remote()  # the partial step 2 replaced by the complete one
    assert sorted(remote) == [2, 4]
    for step in (2, 4):
        local = json.loads((checkpoint_dir(runs / "run", step) / STATE).read_text())["files"]
        assert remote[step]["files"] == local


def test_a_failing_mirror_never_stops_training(reference, sample_shards, tmp_path):
    """A mirror that cannot be written (a file where its folder must be): a warning per
    checkpoint, and the run completes with its local checkpoints."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    runs = tmp_path / "runs"
    done = run_module(
        "train", *overrides(sample_shards, runs, f"checkpoint.mirror={blocker}/m"), timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [ln for ln in done.stdout.splitlines() if ln.startswith("warning: mirroring")]
    assert warnings and all("the next checkpoint tries again" in ln for ln in warnings)
    resumed = final_weights(runs / "run")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.slow
def test_a_slow_upload_is_cut_off_at_the_time_limit(sample_shards, tmp_path):
    """At the end of the run the upload in flight gets checkpoint.mirror_timeout_s: past it
    the run says so in one line and ends (exit 0), its local checkpoints complete."""
    url, runs = str(tmp_path / "mirror"), tmp_path / "runs"
    done = run_module(
        "train",
        *overrides(
            sample_shards, runs, f"checkpoint.mirror={url}", "checkpoint.mirror_timeout_s=0.5"
        ),
        env={"PIPELINE_FAULT": "mirror_stall:4"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "did not finish within checkpoint.mirror_timeout_s=0.5; the local checkpoints are complete"
    ) in done.stdout
    assert [p.name for p in list_checkpoints(runs / "run")] == ["step_0000002", "step_0000004"]
    mirror = mirrored(url, runs / "run")
    assert sorted(mirror.remote()) == [2]  # the process did not wait for step 4's upload
    again = run_module(
        "train", *overrides(sample_shards, runs, f"checkpoint.mirror={url}"), timeout=300
    )
    assert again.returncode == 0 and "run already complete" in again.stdout, again.stderr
    assert sorted(mirror.remote()) == [2, 4]  # the next start uploaded what the mirror lacked


def test_a_url_no_file_system_handles_is_one_line(sample_shards, tmp_path):
    done = run_module(
        "train", *overrides(sample_shards, tmp_path, "checkpoint.mirror=nosuch://x"), timeout=120
    )
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        "error: invalid configuration: checkpoint.mirror=nosuch://x: not a URL fsspec can open "
        "(Protocol not known: nosuch); use a folder, s3://bucket/prefix, gs://bucket/prefix or "
        "hf://models/<repo_id>\n"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the run began


@pytest.fixture(scope="module")
def mirrored_run(sample_shards, tmp_path_factory) -> Path:
    """A finished run (checkpoints 2 and 4) and its folder mirror, side by side: runs/, mirror/."""
    root = tmp_path_factory.mktemp("mirrored")
    train(
        train_config(
            overrides(
                sample_shards,
                root / "runs",
                f"checkpoint.mirror={root}/mirror",
                "checkpoint.keep_last=2",
            )
        )
    )
    return root


@pytest.fixture
def copy(mirrored_run, tmp_path) -> Path:
    """A private copy of mirrored_run, safe to tamper with."""
    return Path(shutil.copytree(mirrored_run, tmp_path / "copy"))


def test_a_damaged_local_checkpoint_is_replaced_by_its_mirrored_copy(copy):
    step4 = checkpoint_dir(copy / "runs" / "run", 4)
    tensors = sorted(step4.glob("*.distcp"))[0]
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated: read_state refuses it
    mirror = mirrored(str(copy / "mirror"), copy / "runs" / "run")
    assert mirror.pull() == step4
    assert (
        tensors.stat().st_size
        == (copy / "mirror/checkpoints/run/step_0000004" / tensors.name).stat().st_size
    )
    assert not (copy / "runs" / "run" / "checkpoints" / ".mirror_download").exists()


def test_a_mirrored_state_naming_files_elsewhere_is_never_pulled(copy):
    """A state.json whose file names leave the checkpoint folder (../): the checkpoint does not
    count as mirrored, nothing is downloaded, and the older one is pulled instead."""
    shutil.rmtree(copy / "runs")
    state_file = copy / "mirror/checkpoints/run/step_0000004" / STATE
    state = json.loads(state_file.read_text())
    state["files"]["../../../../escaped"] = {"bytes": 1, "sha256": "0" * 64}
    state_file.write_text(json.dumps(state))
    mirror = mirrored(str(copy / "mirror"), copy / "runs" / "run")
    assert sorted(mirror.remote()) == [2]
    assert mirror.pull() == checkpoint_dir(copy / "runs" / "run", 2)
    assert not list(copy.rglob("escaped"))


def test_a_new_run_refuses_a_name_the_mirror_holds(copy, sample_shards):
    """checkpoint.resume=never on a machine without the run's folder: the mirror has its
    checkpoints, so the run stops in one line instead of overwriting them."""
    shutil.rmtree(copy / "runs")
    done = run_module(
        "train",
        *overrides(
            sample_shards,
            copy / "runs",
            f"checkpoint.mirror={copy}/mirror",
            "checkpoint.resume=never",
        ),
        timeout=120,
    )
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        f"error: {copy}/mirror/checkpoints/run already holds checkpoints of this run and "
        "checkpoint.resume=never: use checkpoint.resume=auto to continue it, or another "
        "trainer.run_name\n"
    )


def test_a_preempted_run_exits_75_once_its_last_checkpoint_is_mirrored(sample_shards, tmp_path):
    """SIGTERM while the upload of checkpoint 2 is slow (stalled 3 s): the run writes its
    preemption checkpoint, and exits 75 only once the mirror holds it too."""
    url, runs = str(tmp_path / "mirror"), tmp_path / "runs"
    args = overrides(sample_shards, runs, f"checkpoint.mirror={url}", "trainer.max_steps=400")
    metrics = runs / "run" / "metrics.jsonl"
    env = process_env(PIPELINE_FAULT="mirror_stall:2")
    process = subprocess.Popen(
        command("train", *args), cwd=REPO, stdout=subprocess.PIPE, text=True, env=env
    )
    wait_until(process, lambda: metrics.exists() and '"step": 3' in metrics.read_text(), 120)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED, out
    last = list_checkpoints(runs / "run")[-1]
    step = json.loads((last / STATE).read_text())["step"]
    assert 3 <= step < 400 and "stopping after step" in out
    assert step in mirrored(url, runs / "run").remote()
