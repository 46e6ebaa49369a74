"""Typed configuration: one dataclass per Hydra config group, registered as structured configs.

The YAML files under `conf/` only pick values and compose groups; these schemas give every key
its type and default, so an unknown key or a wrong type fails when Hydra composes the config.
Checks that span several values (divisibility, sizes against the data) live in `problems()`
methods and in the stages, which collect every problem and raise once with the fix.

The schemas live beside each other in this package, one module per stage (prepare, train,
evaluate and sample); every name is importable from `pipeline.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.config.evaluate import EvaluateConfig, SampleConfig
from pipeline.config.launch import array_parallelism, parallel_jobs
from pipeline.config.prepare import PrepareConfig, SourceConfig
from pipeline.config.train import (
    COMPILE_MODES,
    DECAY_SHAPES,
    MUON_LR_ADJUSTMENTS,
    OPTIMIZERS,
    PRECISIONS,
    RENAMED,
    SCHEDULES,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggerConfig,
    OptimConfig,
    ProfileConfig,
    RuntimeConfig,
    TrainConfig,
    TrainerConfig,
    budget_steps,
)
from pipeline.errors import ConfigError

__all__ = [
    "COMPILE_MODES",
    "DECAY_SHAPES",
    "MUON_LR_ADJUSTMENTS",
    "OPTIMIZERS",
    "PRECISIONS",
    "RENAMED",
    "SCHEDULES",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "EvaluateConfig",
    "LoggerConfig",
    "OptimConfig",
    "PrepareConfig",
    "ProfileConfig",
    "RuntimeConfig",
    "SampleConfig",
    "SourceConfig",
    "TrainConfig",
    "TrainerConfig",
    "as_dict",
    "budget_steps",
    "conf_dir",
    "register_configs",
    "to_dataclass",
]


def register_configs() -> None:
    """Register the root schemas with Hydra; `conf/*.yaml` list them first in `defaults`."""
    OmegaConf.register_new_resolver("parallel_jobs", parallel_jobs, replace=True)
    OmegaConf.register_new_resolver("array_parallelism", array_parallelism, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="sample_schema", node=SampleConfig)


def to_dataclass(cfg: DictConfig) -> Any:
    """Convert a composed, schema-typed DictConfig into its dataclass (resolving interpolations).
    Raises ConfigError for a mandatory value left unset (???) or an interpolation that does not
    resolve, naming the key."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key, message = getattr(e, "full_key", None) or "the config", str(getattr(e, "msg", e))
        if isinstance(e, MissingMandatoryValue):
            raise ConfigError([f"{key} needs a value: set {key}=..."]) from None
        raise ConfigError(
            [f"{key}: {message.splitlines()[0] if message else type(e).__name__}"]
        ) from None


def as_dict(obj: Any) -> dict:
    """A dataclass config as a plain dict (for checkpoints, JSON and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def conf_dir() -> str:
    """Absolute path of the repository's `conf/` folder."""
    return str(Path(__file__).resolve().parents[2] / "conf")
