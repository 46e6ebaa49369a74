"""Hydra sweeps of real training runs (grid and Optuna), W&B offline grouping, loss plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
import yaml
from helpers.proc import run_module
from helpers.runs import records, wandb_run_record

from pipeline.tools.plot import expand_runs, read_curves


def small(shard_dir: Path, runs_dir: Path, run_name: str) -> list[str]:
    return [
        "experiment=demo", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", f"data.shard_dir={shard_dir}", f"trainer.runs_dir={runs_dir}",
        f"trainer.run_name={run_name}", "trainer.tokens_per_step=512",
        "trainer.micro_batch_size=8", "trainer.max_steps=3", "eval.interval=3",
        "eval.tokens=1024", "checkpoint.interval=3", "eval.sample_tokens=4",
        "optim.warmup_steps=1",
    ]  # fmt: skip


def train_cli(args: list[str]) -> str:
    done = run_module("train", *args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def grid(sample_shards, tmp_path_factory) -> tuple[Path, str]:
    """`sweep=lr_grid` (3 learning rates) with offline W&B."""
    runs = tmp_path_factory.mktemp("grid")
    out = train_cli(small(sample_shards, runs, "lrs") + ["sweep=lr_grid", "logger=wandb"])
    return runs / "lrs", out


def test_grid_sweep_runs_each_job_in_its_own_run(grid):
    sweep, out = grid
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"]
    lrs = []
    for job in jobs:
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        lrs += [o.split("=")[1] for o in overrides if o.startswith("optim.max_lr=")]
        assert (sweep / job / "checkpoints" / "step_0000003" / "state.json").is_file()
        assert [r["step"] for r in records(sweep / job, "train")][-1] == 3
    assert sorted(map(float, lrs)) == [1e-3, 3e-3, 1e-2]
    finals = [records(sweep / job, "val")[-1]["loss"] for job in jobs]
    assert len(set(finals)) == 3  # different learning rates, different results
    assert out.count("run summary") == 3


def test_grid_sweep_wandb_runs_are_grouped_by_sweep(grid):
    sweep, _ = grid
    found = [wandb_run_record(next((sweep / j / "wandb").glob("offline-run-*"))) for j in "012"]
    assert [r.display_name for r in found] == ["lrs/0", "lrs/1", "lrs/2"]
    assert {r.run_group for r in found} == {"lrs"}
    assert len({r.run_id for r in found}) == 3


def test_optuna_sweep_minimises_the_final_validation_loss(sample_shards, tmp_path):
    args = small(sample_shards, tmp_path, "tpe") + ["sweep=lr_optuna", "hydra.sweeper.n_trials=3"]
    train_cli(args)
    result = yaml.safe_load((tmp_path / "tpe" / "optimization_results.yaml").read_text())
    finals = [records(tmp_path / "tpe" / str(i), "val")[-1]["loss"] for i in range(3)]
    assert result["best_value"] == pytest.approx(min(finals))


def test_plot_draws_every_run_of_a_sweep(grid, tmp_path):
    sweep, _ = grid
    runs = expand_runs([sweep])
    assert [p.name for p in runs] == ["0", "1", "2"]
    curves = read_curves(runs[0])
    assert curves.train == [(r["tokens_seen"], r["loss"]) for r in records(runs[0], "train")]
    assert curves.val == [(r["tokens_seen"], r["loss"]) for r in records(runs[0], "val")]
    out = tmp_path / "plots" / "lrs.png"
    done = run_module("plot", str(sweep), "--out", str(out))
    assert done.returncode == 0 and "3 run(s)" in done.stdout
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    missing = run_module("plot", str(tmp_path / "none"))
    assert missing.returncode == 2 and "error: " in missing.stderr
    assert "no metrics.jsonl" in missing.stderr
