"""Edges found by trying commands as a new user would: a diverging run stops with exit 3 rather
than crashing on its perplexity, `plot --out` writes what it says, and every tool's mistyped
argument is one line and exit 2."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
from helpers.proc import run_module
from helpers.runs import records
from helpers.tiny import tiny_run

from pipeline.errors import DIVERGED, USER_ERROR
from pipeline.scoring.loss import perplexity


def test_perplexity_of_a_huge_loss_is_infinite():
    assert perplexity(1.0) == pytest.approx(math.e)
    assert perplexity(709.0) < math.inf
    assert perplexity(800.0) == math.inf and perplexity(4.2e9) == math.inf
    assert math.isnan(perplexity(math.nan))


@pytest.fixture(scope="module")
def diverged(sample_shards, tmp_path_factory):
    """The issue's command: optim.max_lr=1e4 optim.grad_clip=0 on the tiny model."""
    runs = tmp_path_factory.mktemp("runs")
    args = tiny_run(
        sample_shards,
        runs,
        "div",
        "optim.max_lr=1e4",
        "optim.grad_clip=0",
        "optim.warmup_steps=1",
        "trainer.max_steps=20",
        "eval.interval=2",
        "eval.tokens=1024",
    )
    return run_module("train", *args, timeout=300), runs / "div"


def test_a_diverging_run_logs_an_infinite_perplexity_and_stops_with_exit_3(diverged):
    done, run_dir = diverged
    assert done.returncode == DIVERGED, done.stderr[-3000:]
    assert done.stderr == (
        "error: 5 steps in a row had a non-finite loss or gradient norm (last: step 6); the "
        "checkpoint holds the last good weights. Lower optim.max_lr, raise optim.warmup_steps or "
        "check the data, then resume\n"
    )
    huge = [r for r in records(run_dir, "val") if r["loss"] > 709]
    assert huge and all(r["perplexity"] == math.inf for r in huge)
    assert "| perplexity inf" in done.stdout


def test_plot_writes_the_file_it_names(diverged, tmp_path):
    _, run_dir = diverged
    done = run_module("plot", str(run_dir), "--out", str(tmp_path / "curves"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {tmp_path / 'curves.png'} (1 run(s))\n"
    assert matplotlib.image.imread(tmp_path / "curves.png").ndim == 3
    done = run_module("plot", str(run_dir), "--out", str(tmp_path / "curves.svg"))
    assert done.stdout == f"wrote {tmp_path / 'curves.svg'} (1 run(s))\n"
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    "out,message",
    [
        ("folder", "--out {out} is a folder: give a file name, e.g. {out}/loss.png"),
        ("x.xyz", "--out {out}: matplotlib cannot write .xyz files; use one of "),
    ],
)
def test_plot_refuses_a_folder_or_an_unknown_format(diverged, tmp_path, out, message):
    _, run_dir = diverged
    (tmp_path / "folder").mkdir()
    before = sorted(tmp_path.iterdir())
    done = run_module("plot", str(run_dir), "--out", str(tmp_path / out))
    assert done.returncode == USER_ERROR
    assert done.stderr.startswith("error: " + message.format(out=tmp_path / out))
    assert done.stderr.count("\n") == 1 and sorted(tmp_path.iterdir()) == before


def test_plot_without_matplotlib_says_how_to_install_it(diverged, tmp_path):
    """matplotlib is the `plot` extra: without it, plot stops in one line (exit 2) naming the
    extra, before it writes anything."""
    _, run_dir = diverged
    hidden = tmp_path / "hidden" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    out = tmp_path / "curves.png"
    done = run_module(
        "plot", str(run_dir), "--out", str(out), env={"PYTHONPATH": str(hidden.parent)}
    )
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        "error: plots need matplotlib, which is not installed (No module named 'matplotlib'): "
        "pip install -e '.[plot]'\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["plot"], "python -m pipeline.plot: the following arguments are required: runs"),
        (
            ["export", "checkpoint"],
            "python -m pipeline.export checkpoint: the following "
            "arguments are required: checkpoint, out_dir",
        ),
        (
            ["hub", "pull-checkpoint", "me/x"],
            "python -m pipeline.hub pull-checkpoint: the "
            "following arguments are required: run_name",
        ),
        (
            ["plan", "cost", "--gpus", "many"],
            "python -m pipeline.plan cost: argument --gpus: invalid int value: 'many'",
        ),
        (
            ["lm_eval", "runs/x", "--limit", "0"],
            "python -m pipeline.lm_eval: argument --limit: '0' is not a positive integer",
        ),
        (["compare", "--bogus"], "python -m pipeline.compare: unrecognized arguments: --bogus"),
        (["bench", "--bogus"], "python -m pipeline.bench: unrecognized arguments: --bogus"),
    ],
)
def test_every_tool_answers_a_mistyped_argument_in_one_line(args, message, tmp_path):
    done = run_module(*args, cwd=tmp_path, timeout=120)
    assert (done.returncode, done.stderr) == (
        USER_ERROR,
        f"error: {message} (--help shows the usage)\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_help_still_prints_the_usage(tmp_path):
    done = run_module("plot", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m pipeline.plot")


def test_paths_are_checked_before_the_tools_read_anything(tmp_path):
    done = run_module("plot", str(tmp_path / "none"), cwd=tmp_path)
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        f"error: {tmp_path / 'none'}: no metrics.jsonl in it or its subfolders (a run folder?)\n"
    )
