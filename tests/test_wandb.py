"""W&B never decides whether a run trains, tested without network as the failures were found:
no API key is one line and exit 2 before any work; a server that cannot be reached makes the
run log offline under the id its checkpoints keep; W&B's service dying mid-run is one warning
and the run goes on."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers.env import process_env
from helpers.proc import command, run_module
from helpers.runs import records, wandb_run_record
from helpers.tiny import tiny_run

from pipeline.errors import USER_ERROR
from pipeline.training.checkpoint.folder import checkpoint_dir

SETTINGS = ("trainer.max_steps=4", "checkpoint.interval=2", "eval.tokens=1024", "logger=wandb")


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_login(tmp_path: Path) -> dict[str, str]:
    """A machine where nobody ran `wandb login`: an empty home, no netrc, no key."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = home / ".config" / "wandb"
    return {
        "HOME": str(home),
        "NETRC": str(home / ".netrc"),
        "WANDB_API_KEY": "",
        "WANDB_CONFIG_DIR": str(config),
        "WANDB_MODE": "online",
    }


def test_no_api_key_is_one_line_and_exit_2_before_any_work(sample_shards, tmp_path):
    runs = tmp_path / "runs"
    done = run_module(
        "train",
        *tiny_run(sample_shards, runs, "run", *SETTINGS),
        env=no_login(tmp_path),
        timeout=120,
    )
    assert done.returncode == USER_ERROR, done.stderr[-2000:]
    assert done.stderr == (
        "error: invalid configuration: logger=wandb found no W&B API key: run `wandb login` (or "
        "set WANDB_API_KEY) first, or log offline with WANDB_MODE=offline and upload later with "
        "`wandb sync`, or use logger=none\n"
    )
    assert not runs.exists()  # not even the run folder


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_an_unreachable_server_logs_offline_and_a_resume_finds_the_same_run(
    sample_shards, tmp_path
):
    env = {
        **no_login(tmp_path),
        "WANDB_API_KEY": "a" * 40,
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
    }
    runs, args = tmp_path / "runs", [*SETTINGS, "logger.init_timeout=2"]
    started = time.monotonic()
    done = run_module("train", *tiny_run(sample_shards, runs, "run", *args), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    run_dir = runs / "run"
    [first] = offline_runs(run_dir)
    warning = [line for line in done.stdout.splitlines() if line.startswith("warning: W&B")]
    reason = warning[0].split("(", 1)[1].split("):")[0]
    assert warning == [
        f"warning: W&B could not start online ({reason}): logging offline to {first}; upload it "
        f"later with `wandb sync {first}`"
    ]
    state = json.loads((checkpoint_dir(run_dir, 4) / "state.json").read_text())
    assert wandb_run_record(first).run_id == state["wandb_id"]
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]
    # resumed from step 2: the same W&B run id, offline again
    (checkpoint_dir(run_dir, 4) / "state.json").unlink()
    done = run_module("train", *tiny_run(sample_shards, runs, "run", *args), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    second = next(p for p in offline_runs(run_dir) if p != first)
    assert wandb_run_record(second).run_id == state["wandb_id"]


def test_wandb_dying_mid_run_is_one_warning_and_the_run_goes_on(sample_shards, tmp_path):
    """W&B's service process (wandb-core) is killed once the run has logged a step."""
    runs = tmp_path / "runs"
    args = tiny_run(
        sample_shards,
        runs,
        "run",
        "trainer.max_steps=40",
        "checkpoint.interval=0",
        "eval.interval=20",
        "eval.tokens=1024",
        "logger=wandb",
    )
    child = subprocess.Popen(
        command("train", *args),
        env=process_env(WANDB_MODE="offline"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = runs / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    killed = [
        p.kill() or p.name()
        for p in psutil.Process(child.pid).children(recursive=True)
        if p.name() == "wandb-core"
    ]
    out, err = child.communicate(timeout=300)
    assert killed == ["wandb-core"]
    assert child.returncode == 0, err[-3000:]
    assert [r["step"] for r in records(runs / "run", "train")] == list(range(1, 41))
    warnings = [line for line in out.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: W&B stopped working (")
    assert warnings[0].endswith(
        "): training goes on and metrics.jsonl keeps every record; W&B gets no more of this session"
    )
    assert "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.parametrize(
    "value",
    [pytest.param("logger.init_timeout=0", marks=pytest.mark.slow), "logger.finish_timeout=-1"],
)
def test_timeouts_must_be_positive(sample_shards, tmp_path, value):
    done = run_module("train", *tiny_run(sample_shards, tmp_path, "run", value), timeout=120)
    assert done.returncode == USER_ERROR and "logger.init_timeout=" in done.stderr
