"""Evaluation stage: `python -m pipeline.evaluate checkpoint=RUN_OR_CHECKPOINT` (or
`pretrained=gpt2`). The library is pipeline.evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs, to_dataclass
from pipeline.config.cli import check_command_line
from pipeline.errors import guard

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@guard
def main(cfg: DictConfig) -> None:
    from pipeline.evaluation.reports import SUMMARY, describe  # after the command line's check
    from pipeline.evaluation.tasks import evaluate

    r = evaluate(to_dataclass(cfg))
    print(describe(r))
    print(f"wrote {r['path']}, its .md and {Path(r['path']).parent / SUMMARY}")


if __name__ == "__main__":
    guard(check_command_line)("evaluate", sys.argv[1:])  # one line, exit 2, before Hydra runs
    main()
