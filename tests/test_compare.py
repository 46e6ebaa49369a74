"""The optimizer comparison: q, k, v orthogonalised as blocks, and `python -m pipeline.compare`
end to end on a 2-layer model (one rate per sweep, one seed)."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
from helpers.proc import run_module

from pipeline.config import OptimConfig
from pipeline.model import GPT, ModelConfig
from pipeline.tools.compare import split_qkv_optimizer


def test_split_qkv_orthogonalises_each_block_on_its_own():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    cfg = OptimConfig(name="muon", muon_lr=0.02)
    optimizers = split_qkv_optimizer(model, cfg, "cpu")
    w = model.transformer.h[0].attn.c_attn.weight  # (96, 32)
    blocks = [b.detach().clone().requires_grad_() for b in w.split(32)]
    reference = torch.optim.Muon(
        blocks, lr=0.02, weight_decay=0.0, momentum=0.95, adjust_lr_fn="original"
    )
    idx = torch.randint(0, 50257, (4, 17))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    for block, grad in zip(blocks, w.grad.split(32)):
        block.grad = grad.clone()
    reference.step()
    optimizers.step()
    torch.testing.assert_close(w.detach(), torch.cat([b.detach() for b in blocks]))
    optimizers.zero_grad()
    assert w.grad is None  # the whole weight's gradient does not pile up across steps


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
    for heading in ("stage adamw", "stage muon_lr", "stage muon_adamw", "three blocks (split)"):
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
