"""Training stage: `python -m pipeline.train` (one process) or `accelerate launch -m
pipeline.train` (several). The library is pipeline.training; `train(cfg)` is its entry."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs, renamed_key_problems, to_dataclass
from pipeline.errors import PREEMPTED, guard, raise_if
from pipeline.training.loop import check_run_folder, for_sweep_job, train

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@guard
def main(cfg: DictConfig) -> float | None:
    """Train one run; under `-m` (a Hydra sweep), one job of the sweep. Returns the final
    validation loss, the objective a sweeper (e.g. Optuna) minimises. Exits with
    pipeline.errors' codes: 2 config, data or checkpoint problem, 3 diverged, 75 preempted
    after a checkpoint (run again to continue), 130 interrupted."""
    summary = train(for_sweep_job(to_dataclass(cfg)))
    if summary["preempted"]:
        sys.exit(PREEMPTED)
    return summary["val_loss"]  # the objective of Hydra sweepers


@guard
def check_command_line(argv: list[str]) -> None:
    """Before Hydra runs: refuse keys that moved out of `trainer` (pipeline.config.RENAMED),
    naming the new key, instead of Hydra's "Could not override" traceback; and a run folder
    that cannot be created or is in use (pipeline.training.loop.check_run_folder)."""
    raise_if(renamed_key_problems(argv))
    check_run_folder(argv)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
