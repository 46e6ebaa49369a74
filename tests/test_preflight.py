"""`make preflight` on a machine without a GPU: it runs what applies (versions, the C compiler,
the disk) and names what it skipped; its synthetic shards train like prepared ones."""

from __future__ import annotations

from helpers.proc import run_module
from helpers.tiny import tiny_run, train_config

from pipeline.data.shards import open_split
from pipeline.tools.preflight import synthetic_shards
from pipeline.training.loop import train

GPU_ONLY = ("bf16", "attention", "step", "optimizers", "nccl", "recipe")


def test_preflight_on_a_cpu_runs_what_applies_and_names_the_rest(tmp_path):
    done = run_module(
        "preflight", "--write-mib", "8", "--experiment", "gpt2_124m_10bt", cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    for name in GPU_ONLY:
        assert f"{name}: skipped: " in done.stdout, name
        assert any(line.startswith(f"| {name} | skipped |") for line in lines), name
    disk = next(line for line in lines if line.startswith("disk: ok: "))
    assert f"{tmp_path}: " in disk and " GB free, gpt2_124m_10bt needs ~" in disk
    assert "MB/s (fsync)" in disk
    assert any(line.startswith("versions: ok: python ") for line in lines)
    assert "skipped bf16, attention" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the write test leaves nothing behind


def test_preflight_refuses_an_unknown_recipe_in_one_line(tmp_path):
    done = run_module("preflight", "--experiment", "gpt9", "--write-mib", "1", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(
        "error: invalid configuration: experiment=gpt9: no such option; choose one of "
    )
    assert done.stderr.count("\n") == 1


def test_synthetic_shards_train_like_prepared_ones(tmp_path):
    folder = synthetic_shards(tmp_path / "shards", train_tokens=20_000, val_tokens=5_000)
    assert open_split(folder, "train", 50257, verify_checksums=True).num_tokens == 20_000
    cfg = train_config(
        tiny_run(folder, tmp_path / "runs", "run", "trainer.max_steps=2", "eval.tokens=2048")
    )
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["val_loss"] > 10  # random tokens: ~ln(50257)
