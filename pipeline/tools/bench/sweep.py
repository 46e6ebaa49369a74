"""The sweep benchmark: a sweep's wall time with its jobs side by side against one at a time.

A 4-job sweep of the demo's run (the tiny model, Muon + AdamW; `steps` steps each, a validation
at the end) over optim.max_lr, `python -m pipeline.train --multirun ... hydra/launcher=parallel`
as `make sweep` runs it, with launch.jobs=2 (each job a process with half the cores) and
launch.jobs=1 (one job at a time with all of them), each sweep in a fresh folder. Measured:
the wall time of each whole sweep (seconds), and each job's final validation loss, which must
not depend on how the jobs were scheduled.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.tools.process import run_timed
from pipeline.tools.render import fmt_s, table

SWEEP_CASE = (4, 30, "1e-3,3e-3,1e-2,3e-2")
"""(jobs, steps per job, the max_lr values)."""


@dataclass
class SweepResult:
    jobs: int
    steps: int
    wall_s: dict[int, float]
    """Wall time of the whole sweep by jobs at a time (seconds)."""
    losses: dict[int, list[float]]
    """Each job's final validation loss, by jobs at a time."""

    @property
    def max_difference(self) -> float:
        """The largest difference between a job's final losses under the two schedules."""
        one, two = self.losses[1], self.losses[2]
        return max(abs(a - b) for a, b in zip(one, two, strict=True))


def bench_sweep(shard_dir: Path, work: Path, case=SWEEP_CASE) -> SweepResult:
    """Both sweeps, one after the other."""
    from pipeline.training.runlog import read_records

    jobs, steps, lrs = case
    wall, losses = {}, {}
    for parallel in (2, 1):
        runs = work / f"sweep-{parallel}"
        command = [
            sys.executable,
            "-m",
            "pipeline.train",
            "--multirun",
            "experiment=demo",
            f"data.shard_dir={shard_dir}",
            f"trainer.runs_dir={runs}",
            "trainer.run_name=lrs",
            f"trainer.max_steps={steps}",
            f"eval.interval={steps}",
            "eval.tokens=16384",
            "eval.sample_tokens=0",
            f"checkpoint.interval={steps}",
            f"optim.max_lr={lrs}",
            "hydra/launcher=parallel",
            f"launch.jobs={parallel}",
        ]
        wall[parallel] = run_timed(command).check(f"sweep with launch.jobs={parallel}").seconds
        losses[parallel] = [
            read_records(runs / "lrs" / str(j), "val")[-1]["loss"] for j in range(jobs)
        ]
        print(f"sweep: {jobs} jobs, {parallel} at a time: {wall[parallel]:.1f} s", flush=True)
    return SweepResult(jobs, steps, wall, losses)


def render_sweep(r: SweepResult) -> str:
    rows = [
        [str(n), fmt_s(r.wall_s[n]), ", ".join(f"{v:.4f}" for v in r.losses[n])]
        for n in sorted(r.wall_s)
    ]
    return "\n".join(
        [
            "### sweep: jobs side by side on one machine",
            "",
            f"A {r.jobs}-job sweep over optim.max_lr of the demo's run ({r.steps} steps each, "
            "validation at the end), `python -m pipeline.train --multirun ... "
            "hydra/launcher=parallel` as `make sweep JOBS=N` runs it: each job a process of its "
            "own with cores / N threads. Speed-up of 2 at a time: "
            f"{r.wall_s[1] / r.wall_s[2]:.2f}x. Each job's final loss differs between the two by "
            f"at most {r.max_difference:.1e}: one CPU thread per job against two sums the same "
            "products in another order (tests/test_sweeps.py compares each job side by side with "
            "the same job one at a time, to a relative 1e-5).",
            "",
            table(["jobs at a time", "sweep wall s", "final val loss per job"], rows),
        ]
    )
