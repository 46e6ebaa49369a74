"""The optimizer comparison: `python -m pipeline.compare` end to end on a 2-layer model (one
rate per sweep, one seed)."""

from __future__ import annotations

import matplotlib.image
import pytest
from helpers.proc import run_module


@pytest.mark.slow  # 20 s: real sweeps of the tool that runs for hours
def test_compare_runs_the_sweeps_and_writes_the_tables(sample_shards, tmp_path):
    out, png = tmp_path / "BENCH.md", tmp_path / "loss.png"
    args = [
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        "--png",
        str(png),
        "--adamw-lrs",
        "1e-2",
        "--muon-lrs",
        "0.02",
        "--muon-adamw-lrs",
        "2e-2",
        "--seeds",
        "5",
        "--skip",
        "timing",
        f"data.shard_dir={sample_shards}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=64",
        "trainer.tokens_per_step=512",
        "trainer.micro_batch_size=8",
        "trainer.max_steps=5",
        "eval.interval=5",
        "eval.tokens=1024",
        "optim.warmup_steps=1",
    ]
    done = run_module("compare", *args, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = (tmp_path / "runs" / "compare" / "compare.md").read_text()
    for heading in ("stage adamw", "stage muon_lr", "stage muon_adamw"):
        assert heading in report
    assert "best AdamW: adamw (max_lr 0.01)" in report
    assert "best Muon: muon (max_lr 0.0" in report and ", muon_lr 0.02)" in report
    beside = report.split("stage muon_adamw")[1].split("####")[0]
    assert "| muon | 0.01 | 0.02 |" in beside and "| muon | 0.02 | 0.02 |" in beside
    section = out.read_text()
    assert "<!-- bench:device compare/" in section and report.splitlines()[0] in section
    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    for stage in ("adamw", "muon_lr", "muon_adamw"):
        assert (tmp_path / "runs" / "compare" / stage / "0" / "checkpoints").is_dir()
