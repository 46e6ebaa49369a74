"""A mistyped command line is one line and exit code 2 in every stage, before Hydra runs: an
unknown key names the nearest keys, a wrong type the expected type, an unknown group option the
options that exist; every problem at once; sweeps are checked before any job starts."""

from __future__ import annotations

import pytest
from helpers.proc import run_module

from pipeline.config import RENAMED
from pipeline.config.cli import check_command_line
from pipeline.errors import USER_ERROR, ConfigError

MODELS = "gpt2, gpt2_large, gpt2_medium, gpt2_xl, tiny"
EXPERIMENTS = (
    "compare_tiny, demo, gpt2_124m_10bt, gpt2_124m_muon, gpt2_1558m_10bt, gpt2_1558m_muon, "
    "gpt2_350m_10bt, gpt2_350m_muon, gpt2_774m_10bt, gpt2_774m_muon"
)


def problems(config: str, *argv: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_command_line(config, list(argv), RENAMED if config == "train" else None)
    return info.value.problems


def one_line(*problems: str) -> str:
    return "error: invalid configuration: " + "; ".join(problems) + "\n"


# --------------------------------------------------------------------------- the rows


@pytest.mark.parametrize(
    "module,args,expected",
    [
        (
            "train",
            ["trainer.max_stepz=1"],
            "trainer.max_stepz: no such key; did you mean trainer.max_steps?",
        ),
        ("train", ["trainer.max_steps=abc"], "trainer.max_steps=abc: expected an integer or null"),
        (
            "train",
            ["experiment=nonexistent"],
            f"experiment=nonexistent: no such option; choose one of {EXPERIMENTS}",
        ),
        ("train", ["model=gpt3"], f"model=gpt3: no such option; choose one of {MODELS}"),
        (
            "evaluate",
            ["checkpoint=runs/demo", "eval_tokenz=5"],
            "eval_tokenz: no such key; did you mean eval_tokens?",
        ),
        (
            "prepare",
            ["source=local", "shard_sise=5"],
            "shard_sise: no such key; did you mean shard_size?",
        ),
        (
            "sample",
            ["checkpoint=runs/demo", "promt=hi"],
            "promt: no such key; did you mean prompt?",
        ),
    ],
)
def test_each_stage_answers_a_mistyped_override_in_one_line(module, args, expected, tmp_path):
    done = run_module(module, *args, cwd=tmp_path, timeout=120)
    assert (done.returncode, done.stderr, done.stdout) == (USER_ERROR, one_line(expected), "")
    assert list(tmp_path.iterdir()) == []  # no run folder, no .hydra, no outputs


def test_every_problem_of_a_command_line_at_once(tmp_path):
    done = run_module(
        "train",
        "model=gpt3",
        "trainer.max_stepz=1",
        "optim.max_lr=fast",
        "runtime.compile=maybe",
        "trainer.eval_interval=3",
        "+trainer.foo=1",
        cwd=tmp_path,
    )
    assert done.returncode == USER_ERROR
    assert done.stderr == one_line(
        "trainer.eval_interval was renamed to eval.interval: write eval.interval=3",
        f"model=gpt3: no such option; choose one of {MODELS}",
        "trainer.max_stepz: no such key; did you mean trainer.max_steps?",
        "optim.max_lr=fast: expected a number",
        "runtime.compile=maybe: expected true or false or null",
        "trainer.foo: no such key; trainer has run_name, runs_dir, tokens_per_step, "
        "micro_batch_size, max_steps, max_tokens, log_interval, seed, max_bad_steps",
    )


def test_a_sweep_is_checked_before_any_job_starts(tmp_path):
    done = run_module(
        "train",
        "-m",
        "experiment=demo",
        "model=tiny,gpt9",
        "optim.max_lr=1e-3,abc",
        f"trainer.runs_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert done.returncode == USER_ERROR
    assert done.stderr == one_line(
        f"model=gpt9: no such option; choose one of {MODELS}", "optim.max_lr=abc: expected a number"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()


def test_hydra_full_error_still_shows_hydras_trace(tmp_path):
    done = run_module("train", "trainer.max_stepz=1", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "Could not override 'trainer.max_stepz'" in done.stderr


# --------------------------------------------------------------------------- the checker itself


def test_nearest_keys_come_from_the_same_group_or_from_anywhere():
    assert problems("train", "max_steps=4", "trainr.max_steps=3", "optim.max_lrr=1") == [
        "max_steps: no such key; did you mean trainer.max_steps?",
        "trainr.max_steps: no such key; did you mean trainer.max_steps?",
        "optim.max_lrr: no such key; did you mean optim.max_lr?",
    ]
    assert problems("train", "modle=tiny") == ["modle: no such key; did you mean model?"]
    assert problems("train", "model.n_layer.x=1") == [
        "model.n_layer.x: no such key (model.n_layer is a value, not a group of keys)"
    ]


def test_wrong_types_name_the_type_the_schema_expects():
    assert problems("train", "logger.tags=abc", "model.n_layer=2.5", "trainer.seed=null") == [
        "logger.tags=abc: expected a list such as [a,b]",
        "model.n_layer=2.5: expected an integer",
        "trainer.seed=null: needs an integer, not null",
    ]
    assert problems("sample", "checkpoint=x", "temperature=hot") == [
        "temperature=hot: expected a number"
    ]


def test_plus_and_sweeps_without_m_are_explained():
    assert problems("train", "+trainer.max_steps=1", "optim.max_lr=1e-3,3e-3") == [
        "+trainer.max_steps=1: trainer.max_steps exists already: write trainer.max_steps=1 "
        "(without +)",
        "optim.max_lr=1e-3,3e-3: several values are a sweep: add -m to run one job per value, or "
        "write one value (a list is key=[a,b])",
    ]
    assert problems("train", "a=b=c(") == [
        "a=b=c(: cannot be parsed as key=value (mismatched input '=' expecting <EOF>)"
    ]


def test_unset_values_and_broken_interpolations_are_named():
    assert problems("train", "data.shard_dir=???", "trainer.max_steps=${oops}") == [
        "data.shard_dir needs a value: set data.shard_dir=...",
        "trainer.max_steps=${oops}: cannot be resolved (Interpolation key 'oops' not found)",
    ]


def test_a_sweep_configs_own_values_are_checked_too():
    """`hydra.sweeper.params` of a sweep config: each entry as the same command-line override."""
    argv = ["experiment=demo", "sweep=lr_grid", "hydra.sweeper.params={optim.max_lr: '1e-3,x'}"]
    assert problems("train", *argv) == ["hydra.sweeper.params: optim.max_lr=x: expected a number"]


def test_good_command_lines_pass_and_give_the_composed_config():
    cfg = check_command_line("train", ["experiment=demo", "trainer.max_steps=3"], RENAMED)
    assert cfg.trainer.max_steps == 3 and cfg.trainer.run_name == "demo"
    assert check_command_line("train", ["experiment=demo", "sweep=lr_grid"]) is None  # a sweep
    assert check_command_line("train", ["-m", "optim.max_lr=1e-3,3e-3"]) is None
    argv = ["source=local", "source.paths=[a.parquet,b.parquet]", "prompt_unused=1"]
    assert problems("prepare", *argv) == [
        "prompt_unused: no such key; the config has " + ", ".join(_prepare_keys())
    ]


def _prepare_keys() -> list[str]:
    cfg = check_command_line("prepare", ["source=local"])
    return [k for k in cfg.keys() if k != "hydra"]
