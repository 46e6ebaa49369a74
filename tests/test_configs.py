"""Every config file composes through Hydra into its typed schema, and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from pipeline.config import (
    EvaluateConfig,
    PrepareConfig,
    TrainConfig,
    conf_dir,
    register_configs,
    to_dataclass,
)
from pipeline.errors import ConfigError, raise_if
from pipeline.model import PRESETS

CONF = Path(conf_dir())
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_dataclass(compose(config_name, overrides=overrides))


def test_every_group_has_options():
    for group in ("source", "model", "optim", "trainer", "logger", "experiment", "sweep"):
        assert options(group), group


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in ("model", "optim", "trainer", "logger") for o in options(g)]
    + [f"experiment={o}" for o in options("experiment")]
    + [f"sweep={o}" for o in options("sweep")],
)
def test_train_options_compose_and_validate(override):
    cfg = composed("train", [override])
    assert isinstance(cfg, TrainConfig)
    assert cfg.problems(world_size=1) == []


@pytest.mark.parametrize("name", [o for o in options("experiment") if o.startswith("gpt2_")])
def test_gpt2_recipes_divide_evenly_on_one_to_eight_gpus(name):
    cfg = composed("train", [f"experiment={name}"])
    for world_size in (1, 2, 4, 8):
        assert cfg.problems(world_size) == [], world_size
        per_pass = cfg.trainer.micro_batch_size * cfg.block_size * world_size
        assert cfg.grad_accum_steps(world_size) * per_pass == cfg.trainer.tokens_per_step


@pytest.mark.parametrize("source", options("source"))
def test_prepare_sources_compose_and_validate(source, monkeypatch):
    monkeypatch.setenv("FINEWEB_SAMPLE", "/data/sample.parquet")
    cfg = composed("prepare", [f"source={source}"])
    assert isinstance(cfg, PrepareConfig)
    assert cfg.source.name and cfg.problems() == []
    if cfg.source.kind == "local":
        assert cfg.source.paths == ["/data/sample.parquet"]  # from the environment


def test_evaluate_composes():
    cfg = composed("evaluate", ["checkpoint=runs/demo"])
    assert isinstance(cfg, EvaluateConfig) and cfg.problems() == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_files_match_the_presets(name):
    assert composed("train", [f"model={name}"]).model == PRESETS[name]


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        composed("train", ["trainer.micro_batchsize=8"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        composed("train", ["trainer.micro_batch_size=eight"])


def test_every_problem_is_reported_at_once():
    cfg = composed("train", ["trainer.tokens_per_step=1000", "optim.min_lr=1.0", "model.n_head=5"])
    with pytest.raises(ConfigError) as e:
        raise_if(cfg.problems(world_size=2))
    assert len(e.value.problems) == 3
    text = str(e.value)
    assert "tokens_per_step=1000" in text and "min_lr" in text and "n_head=5" in text


@pytest.mark.parametrize("jobs", [None, 3])
def test_the_parallel_launcher_composes_with_its_number_of_jobs(jobs):
    """conf/hydra/launcher/parallel.yaml: Hydra's joblib launcher, n_jobs from launch.jobs
    (the parallel_jobs resolver: one job per launch.gpus_per_job visible GPUs by default)."""
    overrides = ["sweep=lr_grid", "hydra/launcher=parallel"] + (
        [f"launch.jobs={jobs}"] if jobs else []
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    expected = jobs or max(1, torch.cuda.device_count())  # one job per GPU, 1 without one
    assert cfg.hydra.launcher.n_jobs == expected


@pytest.mark.parametrize("jobs", [None, 4])
def test_the_slurm_launchers_compose_with_the_job_resources(jobs):
    """conf/hydra/launcher/slurm.yaml (and slurm_local.yaml, its path on this machine):
    hydra-submitit-launcher's SLURM launcher with each job's GPUs, time limit and partition
    from launch.*, one task per job (the job starts its own processes), requeued after a
    time limit (max_num_timeout), and as many jobs at once as launch.jobs (256 when null)."""
    overrides = [
        "sweep=lr_grid",
        "hydra/launcher=slurm",
        "launch.partition=gpu",
        "launch.time_min=90",
        "launch.gpus_per_job=8",
    ] + ([f"launch.jobs={jobs}"] if jobs else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        local = compose(
            "train", ["sweep=lr_grid", "hydra/launcher=slurm_local"], return_hydra_config=True
        )
    slurm = cfg.hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.partition, slurm.timeout_min, slurm.gpus_per_node) == ("gpu", 90, 8)
    assert (slurm.tasks_per_node, slurm.nodes, slurm.array_parallelism) == (1, 1, jobs or 256)
    assert slurm.max_num_timeout > 0 and slurm.signal_delay_s == 600
    assert local.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert local.hydra.launcher.gpus_per_node == 0


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_an_optuna_sweep_runs_as_many_trials_at_once_as_its_launcher_runs_jobs(launcher):
    """conf/sweep/lr_optuna.yaml: n_jobs (trials asked of the study at once) follows launch.jobs
    through either launcher (joblib's n_jobs, submitit's array_parallelism)."""
    overrides = ["sweep=lr_optuna", f"hydra/launcher={launcher}", "launch.jobs=3"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper.n_jobs == 3
