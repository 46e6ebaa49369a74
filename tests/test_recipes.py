"""Muon and the WSD schedule on real training runs: exact resumes after kills, the
non-finite-step guard, extending a finished WSD run, and the refusals (Muon on two processes:
test_distributed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO
from helpers.proc import command
from helpers.runs import assert_identical, final_weights, optimizer_state, records, weights
from helpers.tiny import tiny_run, train_config

from pipeline.errors import ConfigError
from pipeline.interop.hf_export import export_hf
from pipeline.interop.hf_weights import load_hf_dir
from pipeline.model import GPT
from pipeline.training.checkpoint.folder import list_checkpoints
from pipeline.training.loop import train

MUON = ["optim=muon", "optim.muon_lr=0.02", "optim.max_lr=1e-2", "optim.min_lr=1e-3"]


def muon_run(shard_dir: Path, runs_dir: Path, run_name: str = "run", *more: str) -> list[str]:
    """The tiny test run with Muon: 6 steps of 2 micro-batches, checkpoints every 2."""
    return tiny_run(
        shard_dir,
        runs_dir,
        run_name,
        *MUON,
        "trainer.max_steps=6",
        "eval.interval=2",
        "eval.tokens=1024",
        "checkpoint.interval=2",
        "checkpoint.keep_last=10",
        "trainer.seed=3",
        *more,
    )


def wsd_run(shard_dir: Path, runs_dir: Path, max_steps: int, *more: str) -> list[str]:
    """A WSD run of max_steps steps: 2 warm-up steps, the last 20% decaying."""
    return tiny_run(
        shard_dir,
        runs_dir,
        "wsd",
        *MUON,
        "optim.schedule=wsd",
        "optim.decay_fraction=0.2",
        f"trainer.max_steps={max_steps}",
        "eval.interval=4",
        "eval.tokens=1024",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
        "trainer.seed=9",
        *more,
    )


@pytest.fixture(scope="module")
def muon_reference(sample_shards, tmp_path_factory) -> Path:
    """The uninterrupted Muon run, in its own process."""
    runs = tmp_path_factory.mktemp("muon")
    subprocess.run(
        command("train", *muon_run(sample_shards, runs)), cwd=REPO, check=True, capture_output=True
    )
    return runs / "run"


def test_muon_checkpoints_hold_both_optimizers(muon_reference):
    checkpoint = list_checkpoints(muon_reference)[-1]
    saved = optimizer_state(checkpoint)
    kinds = {name: sorted(state) for name, state in saved["state"].items()}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == ["momentum_buffer"]  # Muon
    assert kinds["transformer.wte.weight"] == ["exp_avg", "exp_avg_sq", "step"]  # AdamW
    assert kinds["transformer.h.1.ln_2.bias"] == ["exp_avg", "exp_avg_sq", "step"]
    assert [g["peak_lr"] for g in saved["param_groups"]] == [0.02, 1e-2, 1e-2]
    assert records(muon_reference, "val")[-1]["loss"] < records(muon_reference, "val")[0]["loss"]


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=pytest.mark.slow) for f in ("optimizer:3", "checkpoint:4")]
)  # AdamW's kill points are all in test_faults; Muon's resume bit for bit: test_distributed
def test_killed_muon_run_resumes_to_the_same_weights(
    sample_shards, muon_reference, tmp_path, fault
):
    args = muon_run(sample_shards, tmp_path)
    env = {**os.environ, "PIPELINE_FAULT": fault}
    killed = subprocess.run(command("train", *args), cwd=REPO, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    subprocess.run(command("train", *args), cwd=REPO, check=True, capture_output=True)
    assert_identical(tmp_path / "run", muon_reference)


def test_non_finite_muon_step_is_skipped(sample_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULT", "nan:3")
    train(train_config(muon_run(sample_shards, tmp_path, "run", "checkpoint.interval=1")))
    assert [r["step"] for r in records(tmp_path / "run", "skip")] == [3]
    ckpt = tmp_path / "run" / "checkpoints"
    before, after = weights(ckpt / "step_0000002"), weights(ckpt / "step_0000003")
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = [optimizer_state(ckpt / f"step_000000{s}") for s in (2, 3)]
    name = "transformer.h.0.mlp.c_fc.weight"  # no momentum from the skipped step either
    assert torch.equal(
        saved[0]["state"][name]["momentum_buffer"], saved[1]["state"][name]["momentum_buffer"]
    )


def test_a_muon_checkpoint_exports_as_gpt2(muon_reference, tmp_path):
    out = export_hf(muon_reference, tmp_path / "hf")
    model = load_hf_dir(out)
    trained = final_weights(muon_reference)
    for name, tensor in model.state_dict().items():  # the export drops the padding rows
        rows = (
            model.cfg.vocab_size if name in ("transformer.wte.weight", "lm_head.weight") else None
        )
        assert torch.equal(tensor[:rows], trained[name][:rows]), name
    assert isinstance(model, GPT)


def test_muon_refuses_fsdp_and_an_adamw_checkpoint(sample_shards, muon_reference, tmp_path):
    with pytest.raises(ConfigError, match="runtime.fsdp=false"):
        train(train_config(muon_run(sample_shards, tmp_path, "run", "runtime.fsdp=true")))
    assert not (tmp_path / "run").exists()
    shutil.copytree(muon_reference, tmp_path / "run")
    adamw = [a for a in muon_run(sample_shards, tmp_path) if a != "optim=muon"]
    with pytest.raises(ConfigError, match="trained with optim=muon"):
        train(train_config([*adamw, "optim=adamw", "trainer.max_steps=8"]))


# --------------------------------------------------------------------------- WSD


@pytest.fixture(scope="module")
def wsd_long(sample_shards, tmp_path_factory) -> Path:
    """A fresh 15-step WSD run: decay from step 12."""
    runs = tmp_path_factory.mktemp("wsd_long")
    train(train_config(wsd_run(sample_shards, runs, 15)))
    return runs / "wsd"


def test_extended_wsd_run_equals_a_fresh_run_of_the_larger_budget(
    sample_shards, wsd_long, tmp_path, capsys
):
    short = wsd_run(sample_shards, tmp_path, 10)  # decay from step 8
    train(train_config(short))
    run_dir = tmp_path / "wsd"
    # keep_last=1 keeps the end and the last stable step, the one an extension starts from
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000008", "step_0000010"]
    capsys.readouterr()
    summary = train(train_config(wsd_run(sample_shards, tmp_path, 15)))
    out = capsys.readouterr().out
    assert "not resuming from" in out and "resuming from" in out and "step_0000008" in out
    assert summary["steps"] == 15
    extended, fresh = records(run_dir, "train"), records(wsd_long, "train")
    assert [r["step"] for r in extended] == list(range(1, 16))
    assert extended[:12] == fresh[:12]  # identical up to the new decay start
    assert extended == fresh  # and, same budget from there, to the end
    a, b = (
        weights(run_dir / "checkpoints" / "step_0000012"),
        weights(wsd_long / "checkpoints" / "step_0000012"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "checkpoints" / "step_0000012" / "state.json").read_text())[
        "extendable"
    ]


def test_wsd_extension_from_a_decay_checkpoint_is_refused(sample_shards, wsd_long, tmp_path):
    args = wsd_run(sample_shards, tmp_path, 30)
    decayed = wsd_long / "checkpoints" / "step_0000015"
    with pytest.raises(ConfigError, match="step 15 is past the stable phase"):
        train(train_config([*args, f"checkpoint.resume={decayed}"]))


def test_a_longer_cosine_run_is_refused_with_the_reason(sample_shards, tmp_path):
    args = tiny_run(
        sample_shards,
        tmp_path,
        "cos",
        "trainer.max_steps=3",
        "eval.tokens=0",
        "checkpoint.interval=0",
    )
    train(train_config(args))
    with pytest.raises(ConfigError, match="cosine schedule") as e:
        train(train_config([*args, "trainer.max_steps=6"]))
    assert "optim.schedule=wsd" in str(e.value) and "trainer.run_name" in str(e.value)
    done = subprocess.run(
        command("train", *args, "trainer.max_steps=6"), cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2 and "cosine schedule" in done.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.decay_fraction=0", r"decay_fraction=0.0 must be in \(0, 1\]"),
        ("optim.decay_fraction=1.5", r"decay_fraction=1.5 must be in \(0, 1\]"),
        ("optim.schedule=step", "optim.schedule='step' is unknown"),
        ("optim.decay_shape=cosine", "decay_shape='cosine' is unknown"),
        ("optim.warmup_steps=9", "before warmup ends"),
        ("optim.muon_adjust_lr=spectral", "muon_adjust_lr='spectral' is unknown"),
        ("optim.muon_ns_steps=0", r"muon_ns_steps=0 must be in \[1, 100\)"),
        ("optim.name=sgd", "optim=adamw or optim=muon"),
        ("runtime.loss_impl=fused", "runtime.loss_impl='fused': use one of"),
        ("runtime.loss_impl=liger", "needs a CUDA device and liger-kernel"),
    ],
)
def test_impossible_schedules_and_optimizers_fail_before_any_step(
    sample_shards, tmp_path, override, message
):
    with pytest.raises(ConfigError, match=message):
        train(train_config([*wsd_run(sample_shards, tmp_path, 10), override]))
    assert not (tmp_path / "wsd").exists()
