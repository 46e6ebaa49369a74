"""Schema of how a sweep's jobs share one machine (`launch.*`, hydra/launcher=parallel)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaunchConfig:
    """How the jobs of a sweep share one machine under hydra/launcher=parallel (`make sweep
    JOBS=N GPUS_PER_JOB=k`; pipeline.training.sweep). A single run ignores it."""

    jobs: int | None = None
    """Jobs at a time; null = one per gpus_per_job visible GPUs (1 without a GPU)."""
    gpus_per_job: int = 1
    """GPUs (processes, through accelerate) of each job; on a CPU, its processes."""

    def problems(self) -> list[str]:
        if (self.jobs is not None and self.jobs < 1) or self.gpus_per_job < 1:
            return [f"launch.jobs={self.jobs} and launch.gpus_per_job={self.gpus_per_job} "
                    "must be >= 1 (JOBS, GPUS_PER_JOB)"]  # fmt: skip
        return []


def parallel_jobs(jobs: int | None, gpus_per_job: int) -> int:
    """hydra.launcher.n_jobs of hydra/launcher=parallel (the `parallel_jobs` resolver): `jobs`,
    or one per `gpus_per_job` visible GPUs, 1 without a GPU."""
    if jobs is not None:
        return int(jobs)
    import torch

    return max(1, torch.cuda.device_count() // max(1, int(gpus_per_job)))
