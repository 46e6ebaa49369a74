"""The launch scripts as a cluster runs them: they parse, exit with the training processes' own
code (not torchrun's 1), and launch/slurm.sbatch requeues only what a restart can fix. SLURM's
own commands (srun, scontrol) are stand-ins on PATH that record their calls; the multi-node
launcher runs for real in test_distributed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.env import process_env
from helpers.paths import REPO

from pipeline.errors import USER_ERROR

SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + [REPO / "launch" / "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_launch_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


SKY_TASKS = sorted((REPO / "launch" / "sky").glob("*.yaml"))


def make_targets() -> set[str]:
    """The targets the Makefile defines (`name: ...` at the start of a line)."""
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([a-z][a-z0-9-]*):", text, re.MULTILINE)}


@pytest.mark.parametrize("task", SKY_TASKS, ids=lambda p: p.name)
def test_the_skypilot_tasks_parse_and_run_what_the_makefile_has(task):
    """Each SkyPilot task: YAML with the keys a managed spot job needs (recovery from
    preemption, exit 75 always recovered), setup and run scripts that bash parses, and every
    `make` target they call defined in the Makefile, the mirror passed to the training."""
    spec = yaml.safe_load(task.read_text())
    resources = spec["resources"]
    assert resources["use_spot"] is True and resources["accelerators"].startswith("H100:")
    assert resources["job_recovery"]["recover_on_exit_codes"] == [75]
    assert {"EXPERIMENT", "MIRROR"} <= set(spec["envs"]) and spec["workdir"] == "."
    called = set()
    for part in ("setup", "run"):
        done = subprocess.run(["bash", "-n"], input=spec[part], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        called |= set(re.findall(r"\bmake ([a-z][a-z0-9-]*)", spec[part]))
    assert called and called <= make_targets(), called - make_targets()
    assert 'MIRROR="$MIRROR"' in spec["run"] and "setup-gpu" in called
    assert called & {"train-auto", "train-nodes"}


def test_a_launched_config_error_exits_2_not_torchruns_1():
    """accelerate's launcher exits 1 for any failed worker; the script exits with the worker's
    code, so auto_resume.sh and SLURM stop instead of restarting a config error."""
    env = process_env(NPROC="2", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", "launch/train_single_node.sh", "trainer.max_stepz=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == USER_ERROR, done.stderr[-2000:]
    assert "error: invalid configuration: trainer.max_stepz: no such key" in done.stderr


def fake_slurm(tmp_path: Path, code: int) -> dict[str, str]:
    """srun that exits with `code`, scontrol that names one node and records requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\nexit {code}\n")
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = show ]; then echo node0; exit 0; fi\n'
        f'echo "$@" >> {tmp_path / "requeues"}\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
    }


@pytest.mark.parametrize(
    "code,restarts,after_s,requeued",
    [
        (75, 0, "300", True),  # preempted after a checkpoint: at once
        (1, 0, "-1", True),  # a crash after training a while
        (1, 0, "300", False),  # a crash within 5 minutes: it cannot start
        (2, 0, "-1", False),  # a problem to fix
        (3, 0, "-1", False),  # diverged
        (0, 0, "-1", False),  # done
        (75, 5, "-1", False),  # requeued MAX_REQUEUES times already
    ],
)
def test_slurm_requeues_only_preemptions_and_crashes(tmp_path, code, restarts, after_s, requeued):
    env = {
        **os.environ,
        **fake_slurm(tmp_path, code),
        "SLURM_RESTART_COUNT": str(restarts),
        "REQUEUE_AFTER_S": after_s,
    }
    done = subprocess.run(
        ["bash", "launch/slurm.sbatch", "experiment=gpt2_124m_10bt"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code
    log = tmp_path / "requeues"
    assert (log.read_text() == "requeue 7\n") if requeued else not log.exists()
    if code == 75 and not requeued:
        assert "not requeueing job 7, it was requeued 5 times already" in done.stdout


def test_sigterm_to_the_launch_script_checkpoints_and_exits_75(sample_shards, tmp_path):
    """Preemption through the launcher, as a cloud machine or SLURM sends it to the script's
    process: the script passes SIGTERM on to torchrun, which passes it to both workers; they
    finish the step, checkpoint and exit 75, and so does the script."""
    import time

    from helpers.tiny import tiny_run

    from pipeline.errors import PREEMPTED
    from pipeline.training.checkpoint.folder import list_checkpoints

    args = tiny_run(
        sample_shards,
        tmp_path,
        "run",
        "trainer.max_steps=500",
        "checkpoint.interval=0",
        "eval.interval=0",
    )
    env = process_env(NPROC="2", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    script = subprocess.Popen(
        ["bash", "launch/train_single_node.sh", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        assert script.poll() is None and time.monotonic() < deadline, script.communicate()
        time.sleep(0.2)
    script.terminate()  # the script's process only, not its process group
    out, err = script.communicate(timeout=120)
    assert script.returncode == PREEMPTED, err[-3000:]
    [saved] = list_checkpoints(tmp_path / "run")
    assert 0 < int(saved.name.split("_")[1]) < 500
