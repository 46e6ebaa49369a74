"""Sweep jobs that each train as a process of their own, under two Hydra launchers:

- `hydra/launcher=parallel` (`make sweep JOBS=N GPUS_PER_JOB=k`): Hydra's joblib launcher runs N
  jobs at a time on this machine. Each job holds a slot for its lifetime: on a GPU machine the
  GPUs [i·k, (i+1)·k) of the visible ones, each locked machine-wide (flock on
  GPU_LOCKS/<gpu>.lock, released by the OS when the job ends however it ends), so the jobs of
  two sweeps never share a GPU; on a CPU slot i of the sweep (`<sweep>/.slots/<i>.lock`) with its
  share of the cores (OMP_NUM_THREADS = cores / (N·k)).
- `hydra/launcher=slurm` (`make sweep LAUNCHER=slurm`; `slurm_local` runs the same path on this
  machine with submitit's local executor): hydra-submitit-launcher submits each job as a SLURM
  job with k GPUs; the job holds what SLURM gave it. submitit's notice of a time limit or of a
  preemption (SIGUSR2) makes the training checkpoint and exit 75, and the job is then requeued
  through submitit (checkpoint_and_try_requeue) to continue from that checkpoint.

Either way the job trains as `python -m pipeline.train` (k processes through accelerate,
`launch/train_single_node.sh`) with the job's overrides as the single run `<run_name>/<job>`,
grouped in W&B under `<run_name>`: exactly the run the basic launcher makes of that job, so
running the same sweep again resumes it (a finished job ends at once, an interrupted one
continues from its checkpoint, one never started starts). Its output goes to
`<run_name>/<job>/train.log`; the sweep prints a line as each job starts and ends. The job's
return value, the objective of a sweeper such as Optuna, is the run's final validation loss (NaN
for a job that failed), and its exit code is reported to the sweep's own process
(sweep_exit_code) and kept in the job's record (JOB_RECORD).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import socket
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
"""A sweep job's record, in its folder: its identity and overrides (running the sweep again
continues a job only with the same ones, not, e.g., another trial of another study), the
sweep's overrides of the job (`task`, to launch it again) and, once it ended, its `exit` code."""
EXITS_ENV = "PIPELINE_SWEEP_EXITS"
"""The file the jobs of a sweep append their exit codes to (set by the sweep)."""
SWEPT_ENV = "PIPELINE_SWEEP_KEYS"
"""The keys the sweep's command line sweeps (`key=a,b`, `choice(...)`; a JSON list, set by the
sweep): with hydra.sweeper.params' keys, what tells its jobs apart."""
STOP_ENV = "PIPELINE_SWEEP_STOP"
"""A file whose presence says the sweep (a SLURM job: the job) was told to stop; it holds the
signal's name."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
PASSED_ON = ("SIGTERM", "SIGUSR1", "SIGUSR2")
"""Stop signals a job passes on to its training (a scheduler's, sent to the job's process)."""
REPO = Path(__file__).resolve().parents[2]
BASE_PORT = 29600
"""Slot i's jobs of several processes meet on port BASE_PORT + i (accelerate's own default,
29500, stays free for a run beside the sweep)."""
GPU_LOCKS = Path(tempfile.gettempdir()) / "pipeline-gpus"
"""Machine-wide lock files of the GPUs sweep jobs hold, one per GPU."""
CLUSTER_LAUNCHERS = ("slurm", "slurm_local")
"""hydra/launcher options whose jobs run under submitit, each with its own allocation."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's list, else every device's index."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def slot_env(
    slot: int, slots: int, gpus_per_job: int, gpus: list[str], cores: int
) -> dict[str, str]:
    """The environment variables of the job in `slot` (0-based) of `slots`: its GPUs
    (CUDA_VISIBLE_DEVICES; none without GPUs) and CPU threads (OMP_NUM_THREADS). Raises
    ConfigError when the GPUs do not go round."""
    env = {"OMP_NUM_THREADS": str(max(1, cores // (slots * gpus_per_job)))}
    if gpus:
        if slots * gpus_per_job > len(gpus):
            raise ConfigError(
                f"{slots} jobs of {gpus_per_job} GPUs need {slots * gpus_per_job} "
                f"GPUs, and {len(gpus)} are visible: lower JOBS "
                "(launch.jobs) or GPUS_PER_JOB (launch.gpus_per_job)"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            gpus[slot * gpus_per_job : (slot + 1) * gpus_per_job]
        )
    return env


def slot_locks(folder: Path, slot: int, gpus_per_job: int, gpus: list[str]) -> list[Path]:
    """The lock files of `slot`: one per GPU of it (GPU_LOCKS, machine-wide); on a CPU, the
    slot's own in `folder` (the sweep's)."""
    if gpus:
        return [GPU_LOCKS / f"{g.strip()}.lock" for g in gpus[slot * gpus_per_job :][:gpus_per_job]]
    return [folder / f"{slot}.lock"]


@contextlib.contextmanager
def hold_slot(
    folder: Path,
    slots: int,
    gpus_per_job: int = 1,
    gpus: list[str] | None = None,
    poll_s: float = 0.2,
) -> Iterator[int]:
    """A free slot of `slots` (its number), held until the block ends: flock on each of its
    lock files (slot_locks), all or none."""
    while True:
        for i in range(slots):
            held = _lock_all(slot_locks(folder, i, gpus_per_job, gpus or []))
            if held is None:
                continue
            try:
                yield i
            finally:
                for f in held:
                    f.close()  # releases the lock
            return
        time.sleep(poll_s)


def _lock_all(paths: list[Path]) -> list | None:
    """The open, exclusively locked files of `paths`, or None (and none held) if one is taken."""
    held = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for g in [f, *held]:
                g.close()
            return None
        held.append(f)
    return held


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


def run_job(
    task: list[str],
    run_dir: Path,
    run_name: str,
    group: str,
    job: int,
    swept: set[str],
    gpus_per_job: int,
    slots: int | None,
) -> tuple[float, int]:
    """Run one job as its own process (see the module docstring): in a slot of `slots` it holds
    (hydra/launcher=parallel) or, for slots=None (a SLURM job), on all it was given. Returns its
    final validation loss (NaN if it has none or failed) and exit code, reported to the sweep.
    swept: the keys the sweep varies (what the job's lines show of its overrides). Raises
    ConfigError when the visible GPUs cannot hold `slots` jobs of gpus_per_job."""
    overrides = child_overrides(task, run_name, group)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    params = " ".join(o for o in task if o.split("=")[0] in swept) or " ".join(overrides)
    record, identity = run_dir / JOB_RECORD, job_identity(overrides, swept)
    if record.is_file() and json.loads(record.read_text()).get("identity") != identity:
        print(
            f"error: job {job}: {run_dir} holds a run of other settings than this job's "
            f"({params}): sweep under another trainer.run_name, or delete {run_dir}",
            flush=True,
        )
        _report(job, USER_ERROR)
        return math.nan, USER_ERROR
    entry = {"identity": identity, "overrides": overrides, "task": task}
    write_text_atomic(record, json.dumps(entry, indent=1))
    gpus, cores = visible_gpus(), len(os.sched_getaffinity(0))
    slot_env(0, slots or 1, gpus_per_job, gpus, cores)  # enough GPUs, before waiting for a slot
    holding = (
        hold_slot(run_dir.parent / ".slots", slots, gpus_per_job, gpus)
        if slots
        else contextlib.nullcontext(0)
    )
    with holding as slot:
        mine = slot_env(slot, slots or 1, gpus_per_job, gpus, cores)
        env = {**os.environ, **mine}
        where = (
            f"GPUs {mine['CUDA_VISIBLE_DEVICES']}"
            if "CUDA_VISIBLE_DEVICES" in mine
            else f"OMP_NUM_THREADS={mine['OMP_NUM_THREADS']}"
        )
        print(f"job {job} started ({where}): {params}; log {log}", flush=True)
        if gpus_per_job > 1:  # each slot (each SLURM job: a free port) its own rendezvous
            command = ["bash", str(REPO / "launch" / "train_single_node.sh"), *overrides]
            port = BASE_PORT + slot if slots else _free_port()
            env |= {"NPROC": str(gpus_per_job), "PYTHON": sys.executable, "MAIN_PORT": str(port)}
        else:
            command = [sys.executable, "-m", "pipeline.train", *overrides]
        if stop_requested():  # the sweep was told to stop: no job starts any more
            print(f"job {job} not started: the sweep is stopping", flush=True)
            _report(job, PREEMPTED)
            return math.nan, PREEMPTED
        with open(log, "a") as out, noting_stop_signals():
            child = subprocess.Popen(
                command, cwd=os.getcwd(), env=env, stdout=out, stderr=subprocess.STDOUT
            )
            code = _wait(child)
    val = [r["loss"] for r in read_records(run_dir, "val")] if code == 0 else []
    loss = float(val[-1]) if val else math.nan
    print(f"job {job} ended: exit {code}" + (f", val loss {loss:.4f}" if val else ""), flush=True)
    write_text_atomic(record, json.dumps({**entry, "exit": code}, indent=1))
    _report(job, code)
    return loss, code


def _free_port() -> int:
    """A TCP port free on this machine now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def stop_requested() -> str | None:
    """The name of the signal that told the sweep to stop, or None."""
    path = os.environ.get(STOP_ENV)
    with contextlib.suppress(OSError):
        return Path(path).read_text() or "a signal" if path else None
    return None


def _note_stop(signum: int, frame) -> None:
    """A stop signal (SIGTERM, SIGUSR1, SIGUSR2: a scheduler; SIGINT: Ctrl-C) to any process
    of a parallel sweep (of a SLURM job): noted in the stop file, for every job to see."""
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
    noted meanwhile is passed on as the scheduler's SIGTERM, SIGUSR1 or SIGUSR2 (a Ctrl-C
    reaches the child from the terminal itself)."""
    passed = False
    while child.poll() is None:
        cause = stop_requested()
        if cause and not passed:
            passed = True
            if cause in PASSED_ON:
                child.send_signal(signal.Signals[cause])
        time.sleep(poll_s)
    return child.returncode


def _report(job: int, code: int) -> None:
    path = os.environ.get(EXITS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"job": job, "exit": code}) + "\n")


def command_line_sweeps(argv: list[str]) -> set[str]:
    """The keys that the overrides in argv sweep (`key=a,b`, `key=choice(a,b)`, `range(...)`,
    ...), read by Hydra's own override parser; other arguments (flags) are skipped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


@contextlib.contextmanager
def collect_exits(
    parallel: bool, shared: bool = False, swept: set[str] = frozenset()
) -> Iterator[Path]:
    """In the sweep's own process: a file its jobs report their exit codes to (EXITS_ENV,
    inherited by the launcher's workers, as are the command line's swept keys, SWEPT_ENV),
    removed afterwards; shared (SLURM jobs, on other machines): under `.sweeps/` of the current
    folder, which the jobs share, instead of /tmp.
    parallel (hydra/launcher=parallel): a stop signal to this process is noted for the jobs
    (STOP_ENV) instead of ending it; each running job passes it to its training, which
    checkpoints, and no job starts any more."""
    if shared:
        (Path.cwd() / ".sweeps").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sweep-", dir=Path.cwd() / ".sweeps" if shared else None))
    exits = folder / "exits.jsonl"
    exits.touch()
    os.environ[EXITS_ENV], os.environ[STOP_ENV] = str(exits), str(folder / "stop")
    os.environ[SWEPT_ENV] = json.dumps(sorted(swept))
    try:
        with noting_stop_signals() if parallel else contextlib.nullcontext():
            yield exits
    finally:
        os.environ.pop(EXITS_ENV, None)
        os.environ.pop(STOP_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            (Path.cwd() / ".sweeps").rmdir()  # when no other sweep's is there


def job_exits(exits: Path) -> dict[int, int]:
    """Each job's exit code in the exits file, its last (a requeued job reports again), in the
    order of the jobs' last reports."""
    last: dict[int, int] = {}
    for line in exits.read_text().splitlines():
        if line:
            report = json.loads(line)
            last.pop(report["job"], None)
            last[report["job"]] = report["exit"]
    return last


def sweep_exit_code(exits: Path) -> int:
    """The sweep's exit code from its jobs' (job_exits): 0 when all succeeded; 2 or 3 when a
    job needs a fix (the first such); 75 when a job was stopped (preempted, interrupted,
    killed: running the sweep again continues it); otherwise 1."""
    codes = list(job_exits(exits).values())
    fixes = [c for c in codes if c in (USER_ERROR, DIVERGED)]
    if fixes:
        return fixes[0]
    if any(c in (PREEMPTED, INTERRUPTED) or c < 0 for c in codes):
        return PREEMPTED
    return 1 if any(codes) else 0


def sweep_launcher() -> str | None:
    """How this process runs a job of a sweep: "parallel" (hydra/launcher=parallel, Hydra's
    joblib launcher), "cluster" (hydra/launcher=slurm or slurm_local, hydra-submitit-launcher),
    or None (a single run, or a job of Hydra's basic launcher, which trains in this process)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    target = str(HydraConfig.get().launcher.get("_target_"))
    return "parallel" if "joblib" in target else "cluster" if "submitit" in target else None


def run_sweep_job(cfg, launcher: str) -> float:
    """The job of a sweep this process was given (HydraConfig: its number, overrides and folder
    `<runs_dir>/<run_name>/<job>`), run by run_job; returns its objective. A SLURM job
    (launcher="cluster") that stopped for submitit's notice (SIGUSR2: a time limit or a
    preemption) after its checkpoint is requeued to continue: submitit's own handler of the
    notice, called now that the training has checkpointed, requeues the job and exits."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    job, sweep = hydra.job.num, cfg.trainer.run_name
    swept = {*(hydra.sweeper.get("params") or {}), *json.loads(os.environ.get(SWEPT_ENV, "[]"))}
    cluster = launcher == "cluster"
    notice = _submitit_notice() if cluster else None
    requeue = signal.getsignal(notice) if notice else None  # submitit's, set before the job
    if cluster:  # this job's own stop file: a notice to one SLURM job stops that job only
        os.environ[STOP_ENV] = str(Path(tempfile.mkdtemp(prefix="sweep-job-")) / "stop")
    try:
        loss, code = run_job(
            list(hydra.overrides.task),
            Path(cfg.trainer.runs_dir) / sweep / str(job),
            f"{sweep}/{job}",
            cfg.logger.group or sweep,
            job,
            swept,
            cfg.launch.gpus_per_job,
            None if cluster else int(hydra.launcher.n_jobs),
        )
    except PipelineError as e:  # e.g. too few GPUs: this job's line, the sweep goes on
        print(f"error: job {job}: {one_line(e)}", flush=True)
        _report(job, e.exit_code)
        return math.nan
    cause = stop_requested()
    if cluster:
        shutil.rmtree(Path(os.environ[STOP_ENV]).parent, ignore_errors=True)
    if code == PREEMPTED and notice and cause == notice.name and callable(requeue):
        print(f"job {job}: requeued to continue from its checkpoint", flush=True)
        try:
            requeue(notice, None)  # requeues this job and exits this process (SystemExit)
        except Exception as e:  # submitit's UncompletedJobError: e.g. too many time limits
            print(
                f"job {job} not requeued: {one_line(e)}; run the same sweep again to continue it",
                flush=True,
            )
    return loss


def _submitit_notice() -> signal.Signals:
    """The signal submitit sends before a time limit or a preemption (SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
