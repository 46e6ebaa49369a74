"""Sampling from a trained checkpoint on the command line and in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.proc import run_module
from helpers.tiny import small_config
from hydra import compose, initialize_config_dir

from pipeline.config import SampleConfig, conf_dir, register_configs, to_dataclass
from pipeline.errors import ConfigError
from pipeline.evaluation.sample import sample
from pipeline.training.loop import train

PROMPT = "The meaning of life is, in short,"  # a comma: Hydra needs the value quoted


@pytest.fixture(scope="module")
def run_dir(sample_shards, tmp_path_factory) -> Path:
    """A tiny GPT-2 trained for 2 steps on real FineWeb tokens."""
    runs = tmp_path_factory.mktemp("runs")
    train(small_config(sample_shards, runs, max_steps=2, eval_tokens=0))
    return runs / "run"


def sample_cli(*overrides: str) -> str:
    done = run_module("sample", *overrides)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_greedy_sampling_prints_the_same_continuation_twice(run_dir):
    printed = sample_cli(
        f"checkpoint={run_dir}", f"prompt='{PROMPT}'", "max_new_tokens=6", "temperature=0"
    )
    assert printed.startswith(PROMPT) and len(printed.strip()) > len(PROMPT)
    # greedy decoding: the same text again, in this process, whatever the seed
    cfg = SampleConfig(checkpoint=str(run_dir), prompt=PROMPT, max_new_tokens=6, temperature=0)
    cfg.seed = 5
    assert [t + "\n" for t in sample(cfg)] == [printed]  # print() adds the newline


def test_seeded_samples_repeat_and_differ_between_seeds(run_dir):
    cfg = SampleConfig(checkpoint=str(run_dir), prompt=PROMPT, max_new_tokens=8, num_samples=2)
    cfg.temperature, cfg.top_k, cfg.top_p = 1.0, None, None
    texts = sample(cfg)
    assert texts == sample(cfg) and all(t.startswith(PROMPT) for t in texts)
    assert texts[0] != texts[1]  # seeds 1337 and 1338
    with pytest.raises(ConfigError, match="exactly one of"):
        sample(SampleConfig(prompt=PROMPT))


def test_sample_config_composes_and_validates():
    register_configs()  # as `python -m pipeline.sample` does
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = to_dataclass(compose("sample", ["checkpoint=runs/demo", "top_k=null"]))
    assert isinstance(cfg, SampleConfig) and cfg.top_k is None and cfg.problems() == []
