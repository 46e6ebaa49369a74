"""Sweep jobs side by side on one machine: `hydra/launcher=parallel` (`make sweep JOBS=N
GPUS_PER_JOB=k`), Hydra's joblib launcher running N jobs at a time.

Each job of such a sweep holds a slot for its lifetime: slot i of N is a lock file
`<sweep>/.slots/<i>.lock` (flock, released by the OS when the job ends however it ends), and
owns GPUs [i·k, (i+1)·k) of the visible ones (CUDA_VISIBLE_DEVICES; k processes through
accelerate, `launch/train_single_node.sh`) and, on a CPU, its share of the cores
(OMP_NUM_THREADS = cores / (N·k)). The job trains as a process of its own: `python -m
pipeline.train` with the job's overrides as the single run `<run_name>/<job>`, grouped in W&B
under `<run_name>`, exactly the run the basic launcher makes of that job, so running the same
sweep again resumes it (a finished job ends at once, an interrupted one continues from its
checkpoint, one never started starts). Its output goes to `<run_name>/<job>/train.log`; the
sweep prints a line as each job starts and ends. The job's return value, the objective of a
sweeper such as Optuna, is the run's final validation loss (NaN for a job that failed), and its
exit code is reported to the sweep's own process (sweep_exit_code).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import (
    DIVERGED,
    INTERRUPTED,
    PREEMPTED,
    USER_ERROR,
    ConfigError,
    PipelineError,
    one_line,
)
from pipeline.files import write_text_atomic
from pipeline.training.runlog import read_records

JOB_RECORD = "job.json"
"""A parallel sweep's record, in each job's folder, of the job's overrides: running the sweep
again continues a job only with the same ones (not, e.g., another trial of another study)."""
EXITS_ENV = "PIPELINE_SWEEP_EXITS"
STOP_ENV = "PIPELINE_SWEEP_STOP"
"""A file whose presence says the sweep was told to stop; it holds the signal's name."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""The file the jobs of a parallel sweep append their exit codes to (set by the sweep)."""
REPO = Path(__file__).resolve().parents[2]
BASE_PORT = 29600
"""Slot i's jobs of several processes meet on port BASE_PORT + i (accelerate's own default,
29500, stays free for a run beside the sweep)."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's list, else every device's index."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def slot_env(slot: int, slots: int, gpus_per_job: int, gpus: list[str],
             cores: int) -> dict[str, str]:  # fmt: skip
    """The environment variables of the job in `slot` (0-based) of `slots`: its GPUs
    (CUDA_VISIBLE_DEVICES; none without GPUs) and CPU threads (OMP_NUM_THREADS). Raises
    ConfigError when the GPUs do not go round."""
    env = {"OMP_NUM_THREADS": str(max(1, cores // (slots * gpus_per_job)))}
    if gpus:
        if slots * gpus_per_job > len(gpus):
            raise ConfigError([f"{slots} jobs of {gpus_per_job} GPUs need {slots * gpus_per_job} "
                               f"GPUs, and {len(gpus)} are visible: lower JOBS "
                               "(launch.jobs) or GPUS_PER_JOB (launch.gpus_per_job)"])  # fmt: skip
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            gpus[slot * gpus_per_job : (slot + 1) * gpus_per_job]
        )
    return env


@contextlib.contextmanager
def hold_slot(folder: Path, slots: int, poll_s: float = 0.2) -> Iterator[int]:
    """A free slot of `slots`, held (flock on `<folder>/<i>.lock`) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            f = open(folder / f"{i}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield i
            finally:
                f.close()  # releases the lock
            return
        time.sleep(poll_s)


def child_overrides(task: list[str], run_name: str, group: str) -> list[str]:
    """The overrides of the single run a job is: the job's own (its sweep values, the user's
    settings) without the sweep's (sweep=..., hydra/...), as run `run_name` in W&B group
    `group`."""
    drop = ("sweep=", "hydra/", "hydra.", "trainer.run_name=", "logger.group=")
    kept = [o for o in task if not o.lstrip("+~").startswith(drop)]
    return [*kept, f"trainer.run_name={run_name}", f"logger.group={group}"]


def job_identity(overrides: list[str], swept: set[str]) -> list[str]:
    """What makes a job this job, sorted: its values of the swept keys, or where the sweep names
    none (a `-m key=a,b` sweep), every override but launch.* (how the jobs share the machine,
    which a rerun may change)."""
    if swept:
        return sorted(o for o in overrides if o.split("=")[0].lstrip("+~") in swept)
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("launch."))


def run_job(task: list[str], run_dir: Path, run_name: str, group: str, job: int,
            slots: int, gpus_per_job: int, swept: set[str]) -> float:  # fmt: skip
    """Run one job as its own process (see the module docstring) in a slot it holds; returns
    its final validation loss (NaN if it has none or failed), reporting its exit code.
    swept: the keys the sweep varies (what the job's lines show of its overrides)."""
    overrides = child_overrides(task, run_name, group)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    params = " ".join(o for o in task if o.split("=")[0] in swept) or " ".join(overrides)
    record, identity = run_dir / JOB_RECORD, job_identity(overrides, swept)
    if record.is_file() and json.loads(record.read_text()).get("identity") != identity:
        print(f"error: job {job}: {run_dir} holds a run of other settings than this job's "
              f"({params}): sweep under another trainer.run_name, or delete {run_dir}",
              flush=True)  # fmt: skip
        _report(job, USER_ERROR)
        return math.nan
    write_text_atomic(record, json.dumps({"identity": identity, "overrides": overrides}, indent=1))
    with hold_slot(run_dir.parent / ".slots", slots) as slot:
        mine = slot_env(slot, slots, gpus_per_job, visible_gpus(), len(os.sched_getaffinity(0)))
        env = {**os.environ, **mine}
        where = (f"GPUs {mine['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in mine
                 else f"OMP_NUM_THREADS={mine['OMP_NUM_THREADS']}")  # fmt: skip
        print(f"job {job} started ({where}): {params}; log {log}", flush=True)
        if gpus_per_job > 1:  # each slot its own rendezvous port
            command = ["bash", str(REPO / "launch" / "train_single_node.sh"), *overrides]
            env |= {"NPROC": str(gpus_per_job), "PYTHON": sys.executable,
                    "MAIN_PORT": str(BASE_PORT + slot)}  # fmt: skip
        else:
            command = [sys.executable, "-m", "pipeline.train", *overrides]
        if stop_requested():  # the sweep was told to stop: no job starts any more
            print(f"job {job} not started: the sweep is stopping", flush=True)
            _report(job, PREEMPTED)
            return math.nan
        with open(log, "a") as out, noting_stop_signals():
            child = subprocess.Popen(command, cwd=os.getcwd(), env=env, stdout=out,
                                     stderr=subprocess.STDOUT)  # fmt: skip
            code = _wait(child)
    val = [r["loss"] for r in read_records(run_dir, "val")] if code == 0 else []
    loss = float(val[-1]) if val else math.nan
    print(f"job {job} ended: exit {code}" + (f", val loss {loss:.4f}" if val else ""), flush=True)
    _report(job, code)
    return loss


def stop_requested() -> str | None:
    """The name of the signal that told the sweep to stop, or None."""
    path = os.environ.get(STOP_ENV)
    with contextlib.suppress(OSError):
        return Path(path).read_text() or "a signal" if path else None
    return None


def _note_stop(signum: int, frame) -> None:
    """A stop signal (SIGTERM, SIGUSR1: a scheduler; SIGINT: Ctrl-C) to any process of a
    parallel sweep: noted in the stop file, for every job to see."""
    path = os.environ.get(STOP_ENV)
    if path and not Path(path).exists():
        Path(path).write_text(signal.Signals(signum).name)


@contextlib.contextmanager
def noting_stop_signals() -> Iterator[None]:
    """Stop signals note the stop (_note_stop) instead of ending this process, for the block
    (the main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _note_stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _wait(child: subprocess.Popen, poll_s: float = 0.2) -> int:
    """The child's exit code, after it ends however long it takes (its checkpoint). A stop
    noted meanwhile is passed on as the scheduler's SIGTERM or SIGUSR1 (a Ctrl-C reaches the
    child from the terminal itself)."""
    passed = False
    while child.poll() is None:
        cause = stop_requested()
        if cause and not passed:
            passed = True
            if cause in ("SIGTERM", "SIGUSR1"):
                child.send_signal(signal.Signals[cause])
        time.sleep(poll_s)
    return child.returncode


def _report(job: int, code: int) -> None:
    path = os.environ.get(EXITS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"job": job, "exit": code}) + "\n")


@contextlib.contextmanager
def collect_exits(parallel: bool) -> Iterator[Path]:
    """In the sweep's own process: a file its jobs report their exit codes to (EXITS_ENV,
    inherited by the launcher's workers), removed afterwards. parallel (hydra/launcher=
    parallel): a stop signal to this process is noted for the jobs (STOP_ENV) instead of
    ending it; each running job passes it to its training, which checkpoints, and no job
    starts any more."""
    folder = Path(tempfile.mkdtemp(prefix="sweep-"))
    exits = folder / "exits.jsonl"
    exits.touch()
    os.environ[EXITS_ENV], os.environ[STOP_ENV] = str(exits), str(folder / "stop")
    try:
        with noting_stop_signals() if parallel else contextlib.nullcontext():
            yield exits
    finally:
        os.environ.pop(EXITS_ENV, None)
        os.environ.pop(STOP_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def sweep_exit_code(exits: Path) -> int:
    """The sweep's exit code from its jobs': 0 when all succeeded; 2 or 3 when a job needs a
    fix (the first such); 75 when a job was stopped (preempted, interrupted, killed: running
    the sweep again continues it); otherwise 1."""
    codes = [json.loads(line)["exit"] for line in exits.read_text().splitlines() if line]
    fixes = [c for c in codes if c in (USER_ERROR, DIVERGED)]
    if fixes:
        return fixes[0]
    if any(c in (PREEMPTED, INTERRUPTED) or c < 0 for c in codes):
        return PREEMPTED
    return 1 if any(codes) else 0


def parallel_sweep_job() -> bool:
    """Whether this process runs a job of a sweep under hydra/launcher=parallel (Hydra's joblib
    launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    return hydra.mode == RunMode.MULTIRUN and "joblib" in str(hydra.launcher.get("_target_"))


def run_parallel_job(cfg) -> float:
    """The job of a parallel sweep this process was given (HydraConfig: its number, overrides
    and folder `<runs_dir>/<run_name>/<job>`), run by run_job; returns its objective."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    job, sweep = hydra.job.num, cfg.trainer.run_name
    swept = set(hydra.sweeper.get("params") or {})
    try:
        return run_job(list(hydra.overrides.task), Path(cfg.trainer.runs_dir) / sweep / str(job),
                       f"{sweep}/{job}", cfg.logger.group or sweep, job,
                       int(hydra.launcher.n_jobs), cfg.launch.gpus_per_job, swept)  # fmt: skip
    except PipelineError as e:  # e.g. too few GPUs: this job's line, the sweep goes on
        print(f"error: job {job}: {one_line(e)}", flush=True)
        _report(job, e.exit_code)
        return math.nan
