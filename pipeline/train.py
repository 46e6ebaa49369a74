"""Training stage: `python -m pipeline.train` (one process) or `accelerate launch -m
pipeline.train` (several). The library is pipeline.training; `train(cfg)` is its entry."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import RENAMED, register_configs, to_dataclass
from pipeline.config.cli import check_command_line
from pipeline.errors import PREEMPTED, guard, raise_if, recorded_exit
from pipeline.training.sweep import (
    CLUSTER_LAUNCHERS,
    collect_exits,
    command_line_sweeps,
    job_exits,
    run_sweep_job,
    sweep_exit_code,
    sweep_launcher,
)
from pipeline.training.wandb_run import login_problem

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@guard
def main(cfg: DictConfig) -> float | None:
    """Train one run; under `-m` (a Hydra sweep), one job of the sweep. Returns the final
    validation loss, the objective a sweeper (e.g. Optuna) minimises. Exits with
    pipeline.errors' codes: 2 config, data or checkpoint problem, 3 diverged, 75 preempted
    after a checkpoint (run again to continue), 130 interrupted."""
    launcher = sweep_launcher()
    if launcher:  # hydra/launcher=parallel or slurm: the job trains as a process of its own
        return run_sweep_job(to_dataclass(cfg), launcher)
    from pipeline.training.loop import for_sweep_job, train  # see check()

    summary = train(for_sweep_job(to_dataclass(cfg)))
    if summary["preempted"]:
        sys.exit(PREEMPTED)
    return summary["val_loss"]  # the objective of Hydra sweepers


@guard
def check(argv: list[str]) -> None:
    """Before Hydra runs: the command line (pipeline.config.cli, also naming the new name of a
    key that moved out of `trainer`, pipeline.config.RENAMED), then the run folder of a single
    run, which must not be a file or in use (pipeline.training.loop.check_run_folder), and a
    W&B login where logger=wandb logs online (pipeline.training.wandb_run.login_problem)."""
    cfg = check_command_line("train", argv, RENAMED)
    if cfg is not None and not any(arg.startswith("-") for arg in argv):
        # The training library (torch.distributed, DCP: 2 s) only once the command line is
        # right, so that a mistyped key is answered at once.
        from pipeline.training.loop import check_run_folder

        if os.environ.get("RANK", "0") == "0":  # the process that logs to W&B
            raise_if([p for p in [login_problem(to_dataclass(cfg.logger))] if p])
        check_run_folder(cfg.trainer.runs_dir, cfg.trainer.run_name)


if __name__ == "__main__":
    with recorded_exit():  # the launch scripts' exit code (launch/workers.sh)
        check(sys.argv[1:])
        launcher = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra/launcher=")]
        parallel = launcher[-1:] == ["parallel"]
        shared = bool(launcher) and launcher[-1] in CLUSTER_LAUNCHERS
        swept = command_line_sweeps(sys.argv[1:]) if parallel or shared else set()
        with collect_exits(parallel, shared, swept) as exits:  # the codes of a sweep's jobs
            main()
            code = sweep_exit_code(exits)
            if shared:  # the jobs' own lines are in their logs, on other machines
                for job, exit_code in sorted(job_exits(exits).items()):
                    print(f"job {job}: exit {exit_code}", flush=True)
        if code == PREEMPTED and (parallel or shared):
            print("sweep stopped: run the same command to continue it", flush=True)
        sys.exit(code)
