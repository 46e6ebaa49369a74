"""Hydra sweeps of real training runs (grid and Optuna), W&B offline grouping, loss plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from helpers.env import process_env
from helpers.paths import REPO
from helpers.proc import command, run_module, wait_until
from helpers.runs import records, wandb_run_record

from pipeline.errors import PREEMPTED, ConfigError
from pipeline.tools.plot import expand_runs, read_curves
from pipeline.training import sweep as sweeps
from pipeline.training.checkpoint.folder import list_checkpoints
from pipeline.training.sweep import hold_slot, slot_env, slot_locks, sweep_exit_code


def small(shard_dir: Path, runs_dir: Path, run_name: str) -> list[str]:
    return [
        "experiment=demo",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=64",
        f"data.shard_dir={shard_dir}",
        f"trainer.runs_dir={runs_dir}",
        f"trainer.run_name={run_name}",
        "trainer.tokens_per_step=512",
        "trainer.micro_batch_size=8",
        "trainer.max_steps=3",
        "eval.interval=3",
        "eval.tokens=1024",
        "checkpoint.interval=3",
        "eval.sample_tokens=4",
        "optim.warmup_steps=1",
    ]


def train_cli(args: list[str]) -> str:
    done = run_module("train", *args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def grid(sample_shards, tmp_path_factory) -> tuple[Path, str]:
    """`sweep=lr_grid` (3 learning rates) with offline W&B."""
    runs = tmp_path_factory.mktemp("grid")
    out = train_cli(small(sample_shards, runs, "lrs") + ["sweep=lr_grid", "logger=wandb"])
    return runs / "lrs", out


def test_grid_sweep_runs_each_job_in_its_own_run(grid):
    sweep, out = grid
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"]
    lrs = []
    for job in jobs:
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        lrs += [o.split("=")[1] for o in overrides if o.startswith("optim.max_lr=")]
        assert (sweep / job / "checkpoints" / "step_0000003" / "state.json").is_file()
        assert [r["step"] for r in records(sweep / job, "train")][-1] == 3
    assert sorted(map(float, lrs)) == [1e-3, 3e-3, 1e-2]
    finals = [records(sweep / job, "val")[-1]["loss"] for job in jobs]
    assert len(set(finals)) == 3  # different learning rates, different results
    assert out.count("run summary") == 3


def test_grid_sweep_wandb_runs_are_grouped_by_sweep(grid):
    sweep, _ = grid
    found = [wandb_run_record(next((sweep / j / "wandb").glob("offline-run-*"))) for j in "012"]
    assert [r.display_name for r in found] == ["lrs/0", "lrs/1", "lrs/2"]
    assert {r.run_group for r in found} == {"lrs"}
    assert len({r.run_id for r in found}) == 3


def test_optuna_sweep_minimises_the_final_validation_loss(sample_shards, tmp_path):
    args = small(sample_shards, tmp_path, "tpe") + ["sweep=lr_optuna", "hydra.sweeper.n_trials=3"]
    train_cli(args)
    result = yaml.safe_load((tmp_path / "tpe" / "optimization_results.yaml").read_text())
    finals = [records(tmp_path / "tpe" / str(i), "val")[-1]["loss"] for i in range(3)]
    assert result["best_value"] == pytest.approx(min(finals))


@pytest.mark.slow
def test_optuna_trials_run_side_by_side_and_the_study_continues(sample_shards, tmp_path):
    """`make sweep SWEEP=lr_optuna JOBS=2`: two trials at a time, the study stored under the
    sweep folder; best_value is the lowest final validation loss. The same command with a
    larger n_trials runs only the trial the study lacks (job 2), retraining none."""
    args = small(sample_shards, tmp_path, "tpe")
    first = make_sweep([*args, "hydra.sweeper.n_trials=2"], "JOBS=2", sweep="lr_optuna")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert out.index("job 1 started") < out.index("job 0 ended")  # side by side
    sweep = tmp_path / "tpe"
    assert (sweep / "optuna.db").is_file()
    logs = [(sweep / j / "train.log").read_text() for j in "01"]
    again = make_sweep([*args, "hydra.sweeper.n_trials=3"], "JOBS=2", sweep="lr_optuna")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "job 2 started" in out and "job 0 started" not in out and "job 1 started" not in out
    assert [(sweep / j / "train.log").read_text() for j in "01"] == logs
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finals = [records(sweep / str(i), "val")[-1]["loss"] for i in range(3)]
    assert result["best_value"] == pytest.approx(min(finals))


def test_plot_draws_every_run_of_a_sweep(grid, tmp_path):
    sweep, _ = grid
    runs = expand_runs([sweep])
    assert [p.name for p in runs] == ["0", "1", "2"]
    curves = read_curves(runs[0])
    assert curves.train == [(r["tokens_seen"], r["loss"]) for r in records(runs[0], "train")]
    assert curves.val == [(r["tokens_seen"], r["loss"]) for r in records(runs[0], "val")]
    out = tmp_path / "plots" / "lrs.png"
    done = run_module("plot", str(sweep), "--out", str(out))
    assert done.returncode == 0 and "3 run(s)" in done.stdout
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    missing = run_module("plot", str(tmp_path / "none"))
    assert missing.returncode == 2 and "error: " in missing.stderr
    assert "no metrics.jsonl" in missing.stderr


# ------------------------------------------------------------------- jobs side by side (JOBS)


def make_sweep(
    args: list[str],
    *make_vars: str,
    env: dict[str, str] | None = None,
    sweep: str = "lr_grid",
    **popen,
) -> subprocess.Popen:
    """`make sweep SWEEP=<sweep> ...` with this interpreter, its setup taken as done (-o)."""
    command = [
        "make",
        "-s",
        "-o",
        ".venv/.installed",
        "sweep",
        f"PYTHON={sys.executable}",
        f"SWEEP={sweep}",
        *make_vars,
        "ARGS=" + " ".join(args),
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=process_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_jobs_side_by_side_give_each_job_the_result_it_has_alone(sample_shards, grid, tmp_path):
    """`make sweep JOBS=2`: the 3 jobs of sweep=lr_grid run two at a time, each a process of its
    own on its half of the cores (OMP_NUM_THREADS), in runs/lrs/<job> as before, and each
    ends with the validation loss the same job has in the one-at-a-time sweep."""
    process = make_sweep(small(sample_shards, tmp_path, "lrs"), "JOBS=2")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    sweep, threads = tmp_path / "lrs", max(1, (os.cpu_count() or 1) // 2)
    for job in "012":
        assert f"job {job} started (OMP_NUM_THREADS={threads}): optim.max_lr=" in out
        assert f"job {job} ended: exit 0, val loss " in out
        alone = records(grid[0] / job, "val")[-1]["loss"]
        assert records(sweep / job, "val")[-1]["loss"] == pytest.approx(alone, rel=1e-5)
        log = (sweep / job / "train.log").read_text()
        assert (
            "run summary" in log
            and f"trainer.run_name=lrs/{job}"
            in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        )
    starts = [out.index(f"job {j} started") for j in "012"]
    assert out.index("job 1 started") < out.index("job 0 ended")  # two at a time
    assert max(starts) > min(out.index(f"job {j} ended") for j in "01")  # not three


@pytest.mark.slow
def test_a_killed_sweep_run_again_continues_it(sample_shards, tmp_path):
    """The whole sweep killed (SIGKILL to every process of it) while job 1 is between two
    checkpoints: running the same command again ends job 0 at once (already complete),
    continues job 1 from its checkpoint and starts job 2; all three end complete."""
    longer = {"trainer.max_steps": "6", "eval.interval": "6", "checkpoint.interval": "2"}
    args = [a for a in small(sample_shards, tmp_path, "lrs") if a.split("=")[0] not in longer]
    args += [f"{k}={v}" for k, v in longer.items()]
    sweep = tmp_path / "lrs"
    process = make_sweep(args, "JOBS=1", env={"PIPELINE_FAULT": "stall:4"}, start_new_session=True)
    step3 = sweep / "1" / "checkpoints" / "step_0000003" / "state.json"
    wait_until(process, step3.is_file, 240)
    os.killpg(process.pid, signal.SIGKILL)  # job 1's checkpoint 4 is still being written
    process.communicate(timeout=60)
    steps = {j: [p.name for p in list_checkpoints(sweep / j)] for j in "01"}
    assert steps["0"] == ["step_0000003", "step_0000004", "step_0000006"]  # 3: WSD's last
    assert steps["1"] == ["step_0000002", "step_0000003"]  # stable step, kept
    assert not (sweep / "2" / "checkpoints").exists()
    loss0 = records(sweep / "0", "val")[-1]["loss"]

    again = make_sweep(args, "JOBS=1")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "run already complete: 6 of 6 steps done" in (sweep / "0" / "train.log").read_text()
    assert (
        f"resuming from {sweep / '1' / 'checkpoints' / 'step_0000003'}"
        in (sweep / "1" / "train.log").read_text()
    )
    for job in "012":
        assert [p.name for p in list_checkpoints(sweep / job)][-1] == "step_0000006"
    assert records(sweep / "0", "val")[-1]["loss"] == loss0


def test_each_slot_gets_its_own_gpus_and_share_of_the_cores(tmp_path, monkeypatch):
    gpus = ["0", "1", "2", "3"]
    assert slot_env(1, 2, 2, gpus, 16) == {"CUDA_VISIBLE_DEVICES": "2,3", "OMP_NUM_THREADS": "4"}
    assert slot_env(0, 2, 1, [], 2) == {"OMP_NUM_THREADS": "1"}  # a CPU: half the cores
    with pytest.raises(ConfigError, match="3 jobs of 2 GPUs need 6 GPUs, and 4 are visible"):
        slot_env(0, 3, 2, gpus, 16)
    with hold_slot(tmp_path, 2) as first, hold_slot(tmp_path, 2) as second:
        assert {first, second} == {0, 1}  # held for the block's lifetime, never shared
    with hold_slot(tmp_path, 2) as again:
        assert again == 0  # released when its holder ended
    # GPUs are held machine-wide: a second sweep (another folder, other slot sizes) never
    # gets a GPU a job of the first holds
    monkeypatch.setattr(sweeps, "GPU_LOCKS", tmp_path / "gpus")
    with hold_slot(tmp_path / "a", 4, 1, gpus) as a, hold_slot(tmp_path / "b", 2, 2, gpus) as b:
        assert (a, b) == (0, 1)  # b's slot 0 (GPUs 0 and 1) would share GPU 0
        assert sweeps._lock_all(slot_locks(tmp_path / "c", 0, 3, gpus)) is None  # 0-2 taken
        with hold_slot(tmp_path / "c", 4, 1, gpus) as c:
            assert c == 1  # GPU 1: neither a's nor b's
    assert sorted(p.name for p in (tmp_path / "gpus").iterdir()) == [f"{g}.lock" for g in gpus]


@pytest.mark.parametrize(
    "codes,expected",
    [([0, 0], 0), ([0, 75], 75), ([75, 2, 3], 2), ([-9, 0], 75), ([130], 75), ([1, 0], 1), ([], 0)],
)
def test_a_sweep_exits_with_what_its_jobs_need(codes, expected, tmp_path):
    exits = tmp_path / "exits.jsonl"
    exits.write_text("".join(json.dumps({"job": i, "exit": c}) + "\n" for i, c in enumerate(codes)))
    assert sweep_exit_code(exits) == expected
    with exits.open("a") as f:  # a requeued job reports again: its last code counts
        f.writelines(json.dumps({"job": i, "exit": 0}) + "\n" for i in range(len(codes)))
    assert sweep_exit_code(exits) == 0


@pytest.mark.slow
@pytest.mark.parametrize("to", ["sweep", "group"])
def test_a_stopped_sweep_checkpoints_its_jobs_and_exits_75(sample_shards, tmp_path, to):
    """SIGTERM to the sweep's own process (to=sweep) or to every process of it (to=group, as a
    scheduler sends it) while two jobs train side by side and a third waits: both training runs
    checkpoint and stop (exit 75), the third never starts, and the sweep exits 75."""
    long = [
        a
        for a in small(sample_shards, tmp_path, "lrs")
        if not a.startswith(("trainer.max_steps=", "eval.interval=", "checkpoint.interval="))
    ] + ["trainer.max_steps=400", "eval.interval=400", "checkpoint.interval=400"]
    process = subprocess.Popen(
        command("train", *long, "sweep=lr_grid", "hydra/launcher=parallel", "launch.jobs=2"),
        cwd=REPO,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = [tmp_path / "lrs" / j / "metrics.jsonl" for j in "01"]
    trained = lambda m: m.exists() and '"kind": "train"' in m.read_text()  # noqa: E731
    wait_until(process, lambda: all(map(trained, metrics)), 240)
    if to == "sweep":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED, out[-3000:]
    for job in "01":
        assert f"job {job} ended: exit {PREEMPTED}" in out
        step = json.loads((list_checkpoints(tmp_path / "lrs" / job)[-1] / "state.json").read_text())
        assert 1 <= step["step"] < 400
    assert "job 2 not started: the sweep is stopping" in out
    assert out.rstrip().endswith("sweep stopped: run the same command to continue it")


# --------------------------------------------------------- SLURM jobs (hydra/launcher=slurm)


def job_process(run_name: str) -> int:
    """The pid of the process of a sweep job whose training (run `run_name`) runs now: the
    training process's parent."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if b"pipeline.train" in args and f"trainer.run_name={run_name}".encode() in args:
                return int(stat.rsplit(")", 1)[1].split()[1])  # ppid
    raise AssertionError(f"no training process of {run_name}")


@pytest.mark.slow
def test_a_slurm_sweep_requeues_a_job_at_its_time_limit_and_it_continues(sample_shards, tmp_path):
    """`make sweep LAUNCHER=slurm_local`: the SLURM launcher's path with submitit's local
    executor (real job processes). submitit's notice of a time limit (SIGUSR2 to the job's
    process, as SLURM sends it) makes job 0's training checkpoint and exit 75; submitit
    requeues the job, which continues from that checkpoint to the end. The sweep exits 0 and
    lists each job's exit code."""
    replaced = ("trainer.max_steps=", "eval.interval=", "checkpoint.interval=")
    args = [a for a in small(sample_shards, tmp_path, "lrs") if not a.startswith(replaced)]
    # the command line's sweep (2 jobs: max_steps 300 and 6) replaces lr_grid's learning rates
    args += ["eval.interval=1000", "checkpoint.interval=1000", "optim.max_lr=1e-3"]
    args += ["trainer.max_steps=300,6"]
    process = make_sweep(args, "LAUNCHER=slurm_local", start_new_session=True)
    metrics = tmp_path / "lrs" / "0" / "metrics.jsonl"
    wait_until(process, lambda: metrics.exists() and '"kind": "train"' in metrics.read_text(), 240)
    os.kill(job_process("lrs/0"), signal.SIGUSR2)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    assert "job 0: exit 0" in out and "job 1: exit 0" in out
    sweep = tmp_path / "lrs"
    log = (sweep / "0" / "train.log").read_text()
    stopped = int(log.split("stopping after step ")[1].split()[0])  # on the notice
    assert 1 <= stopped < 300 and "on SIGUSR2" in log
    assert f"resuming from {sweep / '0' / 'checkpoints' / f'step_{stopped:07d}'}" in log
    assert list_checkpoints(sweep / "0")[-1].name == "step_0000300"  # continued to the end
    submitit = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "job 0: requeued to continue from its checkpoint" in submitit
    assert "Requeued job" in submitit
    assert list_checkpoints(sweep / "1")[-1].name == "step_0000006"  # job 1 untouched by it


@pytest.mark.slow
def test_a_killed_optuna_sweep_continues_its_interrupted_trial(sample_shards, tmp_path):
    """`make sweep SWEEP=lr_optuna JOBS=1`, killed (SIGKILL to every process) while its second
    trial (job 1) is between checkpoints: running it again continues job 1 from its checkpoint
    in its own folder, with its own values, and adds its result to the study as a completed
    trial; no third job starts (2 trials were asked for), and job 0 is not trained again."""
    longer = {"trainer.max_steps": "6", "eval.interval": "6", "checkpoint.interval": "2"}
    args = [a for a in small(sample_shards, tmp_path, "tpe") if a.split("=")[0] not in longer]
    args += [f"{k}={v}" for k, v in longer.items()] + ["hydra.sweeper.n_trials=2"]
    sweep = tmp_path / "tpe"
    process = make_sweep(
        args, "JOBS=1", env={"PIPELINE_FAULT": "stall:4"}, sweep="lr_optuna", start_new_session=True
    )
    step3 = sweep / "1" / "checkpoints" / "step_0000003" / "state.json"
    wait_until(process, step3.is_file, 240)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    values = json.loads((sweep / "1" / "job.json").read_text())["identity"]
    log0 = (sweep / "0" / "train.log").read_text()

    again = make_sweep(args, "JOBS=1", sweep="lr_optuna")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "job 1 started" in out and "job 0 started" not in out and "job 2" not in out
    assert (
        f"resuming from {sweep / '1' / 'checkpoints' / 'step_0000003'}"
        in (sweep / "1" / "train.log").read_text()
    )
    assert json.loads((sweep / "1" / "job.json").read_text())["identity"] == values
    assert (sweep / "0" / "train.log").read_text() == log0
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finals = [records(sweep / str(i), "val")[-1]["loss"] for i in range(2)]
    assert result["best_value"] == pytest.approx(min(finals))
