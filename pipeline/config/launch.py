"""Schema of how a sweep's jobs run (`launch.*`): side by side on one machine
(hydra/launcher=parallel) or as SLURM jobs (hydra/launcher=slurm)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaunchConfig:
    """How the jobs of a sweep run: under hydra/launcher=parallel side by side on one machine
    (`make sweep JOBS=N GPUS_PER_JOB=k`), under hydra/launcher=slurm as SLURM jobs (`make sweep
    LAUNCHER=slurm PARTITION=p TIME_MIN=t`); pipeline.training.sweep. A single run ignores it."""

    jobs: int | None = None
    """Jobs at a time; null = one per gpus_per_job visible GPUs (1 without a GPU); on SLURM, at
    most this many at once (the array's parallelism; null: 256)."""
    gpus_per_job: int = 1
    """GPUs (processes, through accelerate) of each job; on a CPU, its processes."""
    partition: str | None = None
    """SLURM: the partition the jobs are submitted to (null: the cluster's default)."""
    time_min: int = 240
    """SLURM: each job's time limit, minutes; a job that reaches it checkpoints and is
    requeued to continue (hydra.launcher.max_num_timeout times at most)."""

    def problems(self) -> list[str]:
        if (self.jobs is not None and self.jobs < 1) or self.gpus_per_job < 1:
            return [
                f"launch.jobs={self.jobs} and launch.gpus_per_job={self.gpus_per_job} "
                "must be >= 1 (JOBS, GPUS_PER_JOB)"
            ]
        if self.time_min < 1:
            return [f"launch.time_min={self.time_min} must be >= 1 minute (TIME_MIN)"]
        return []


def parallel_jobs(jobs: int | None, gpus_per_job: int) -> int:
    """hydra.launcher.n_jobs of hydra/launcher=parallel (the `parallel_jobs` resolver): `jobs`,
    or one per `gpus_per_job` visible GPUs, 1 without a GPU."""
    if jobs is not None:
        return int(jobs)
    import torch

    return max(1, torch.cuda.device_count() // max(1, int(gpus_per_job)))


def array_parallelism(jobs: int | None) -> int:
    """hydra.launcher.array_parallelism of hydra/launcher=slurm (the `array_parallelism`
    resolver): `jobs`, or 256 (hydra-submitit-launcher's default) when null."""
    return 256 if jobs is None else int(jobs)
