"""Sampling: `python -m pipeline.sample checkpoint=runs/NAME prompt='Once upon a time'` (or
`pretrained=gpt2`). The library is pipeline.evaluation.sample."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs, to_dataclass
from pipeline.config.cli import check_command_line
from pipeline.errors import guard

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
@guard
def main(cfg: DictConfig) -> None:
    from pipeline.evaluation.sample import sample  # after the command line's check

    print("\n---\n".join(sample(to_dataclass(cfg))))


if __name__ == "__main__":
    guard(check_command_line)("sample", sys.argv[1:])  # one line, exit 2, before Hydra runs
    main()
