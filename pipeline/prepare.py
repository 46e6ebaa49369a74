"""Prepare stage: `python -m pipeline.prepare source=NAME [key=value ...]`, FineWeb (or local
files) to llm.c-format shards and their manifest. The library is pipeline.data."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs, to_dataclass
from pipeline.config.cli import check_command_line
from pipeline.errors import guard

register_configs()  # the schemas must be in Hydra's ConfigStore before @hydra.main composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
@guard
def main(cfg: DictConfig) -> None:
    from pipeline.data.writer import prepare  # after the command line's check

    prepare(to_dataclass(cfg))


if __name__ == "__main__":
    guard(check_command_line)("prepare", sys.argv[1:])  # one line, exit 2, before Hydra runs
    main()
