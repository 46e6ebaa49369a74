"""Training on real FineWeb shards: learning, accumulation, exact resume, config errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from helpers.paths import REPO
from helpers.runs import final_weights, records
from helpers.tiny import small_config

from pipeline.config import (
    EvaluateConfig,
    LoggerConfig,
    OptimConfig,
)
from pipeline.data.loader import TrainLoader, ValidationWindows
from pipeline.data.shards import open_split
from pipeline.errors import CheckpointError, ConfigError, ShardError
from pipeline.evaluation.tasks import evaluate
from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint.folder import list_checkpoints
from pipeline.training.loop import SingleProcess, TrainStep, accumulate_gradients, train
from pipeline.training.optim import build_optimizer


def test_training_lowers_validation_loss_and_writes_the_run(sample_shards, tmp_path):
    cfg = small_config(
        sample_shards, tmp_path, max_steps=12, eval_interval=6, checkpoint_interval=6, keep_last=1
    )
    summary = train(cfg)
    run_dir = tmp_path / "run"
    val = records(run_dir, "val")
    assert [r["step"] for r in val] == [0, 6, 12]
    assert val[0]["loss"] == pytest.approx(math.log(50257), abs=0.3)  # untrained: uniform
    assert val[-1]["loss"] < val[0]["loss"] - 1.0
    assert summary["val_loss"] == val[-1]["loss"]
    assert summary["tokens_seen"] == 12 * 512
    train_steps = records(run_dir, "train")
    assert [r["step"] for r in train_steps] == list(range(1, 13))
    assert all(r["tokens_seen"] == r["step"] * 512 for r in train_steps)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000012"]  # keep_last=1
    weights = final_weights(run_dir)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)


def test_gradient_accumulation_matches_one_large_batch(sample_shards):
    """k micro-batches leave the same gradient as one batch k times larger."""
    accelerator = Accelerator(cpu=True)
    split = open_split(sample_shards, "train")
    grads, losses = [], []
    for micro_batch_size, grad_accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
        loader = TrainLoader(split, 64, micro_batch_size, seed=3)
        losses.append(accumulate_gradients(model, loader.next_batch, grad_accum, accelerator))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for name, g in grads[0].items():
        # float32 sums in a different order: tolerance relative to the gradient's scale
        torch.testing.assert_close(
            grads[1][name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name
        )


def test_one_process_step_is_the_training_step(sample_shards):
    """TrainStep through SingleProcess (the planner's memory probe) updates the weights exactly
    as through the Accelerator training uses."""
    split, optim = open_split(sample_shards, "train"), OptimConfig(max_lr=1e-2, warmup_steps=1)
    models = []
    for processes in (Accelerator(cpu=True), SingleProcess(torch.device("cpu"))):
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
        step = TrainStep(model, model, build_optimizer(model, optim, "cpu"), 2, 1.0, processes)
        loader = TrainLoader(split, 64, 4, seed=3)
        results = [step(i + 1, 1.0, loader.next_batch) for i in range(2)]
        assert all(r.finite and not r.stopping for r in results)
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_training_with_accumulation_follows_the_single_batch_run(sample_shards, tmp_path):
    accumulated = small_config(
        sample_shards, tmp_path, run_name="k4", micro_batch_size=2, max_steps=3, eval_tokens=0
    )
    single = small_config(
        sample_shards, tmp_path, run_name="k1", micro_batch_size=8, max_steps=3, eval_tokens=0
    )
    assert accumulated.grad_accum_steps(1) == 4 and single.grad_accum_steps(1) == 1
    train(accumulated)
    train(single)
    la = [r["loss"] for r in records(tmp_path / "k4", "train")]
    lb = [r["loss"] for r in records(tmp_path / "k1", "train")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_resumed_run_continues_exactly(sample_shards, tmp_path):
    cfg = small_config(sample_shards, tmp_path)
    train(cfg)
    run_dir = tmp_path / "run"
    uninterrupted_train = records(run_dir, "train")
    uninterrupted_val = records(run_dir, "val")
    weights = final_weights(run_dir)
    # Lose everything after the step-3 checkpoint, as a crash between checkpoints would.
    shutil.rmtree(run_dir / "checkpoints" / "step_0000006")
    summary = train(small_config(sample_shards, tmp_path, resume="auto"))
    assert summary["steps"] == 6
    assert records(run_dir, "train") == uninterrupted_train  # steps 1-6, none repeated
    assert records(run_dir, "val") == uninterrupted_val
    resumed = final_weights(run_dir)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


def test_profiled_steps_write_a_trace_and_train_the_same(sample_shards, tmp_path, capsys):
    plain = small_config(sample_shards, tmp_path, run_name="plain", checkpoint_interval=0)
    train(plain)
    profiled = small_config(
        sample_shards,
        tmp_path,
        run_name="profiled",
        checkpoint_interval=0,
        profile_steps=2,
        profile_start=1,
    )
    train(profiled)
    assert records(tmp_path / "profiled", "train") == records(tmp_path / "plain", "train")
    out = tmp_path / "profiled" / "profile"
    assert f"profile written: {out / 'trace.json'}" in capsys.readouterr().out
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # steps 3 and 4: 1 skipped, 1 warm-up
    assert {
        "aten::addmm",
        "aten::scaled_dot_product_attention",
        "Optimizer.step#AdamW.step",
    } <= names
    ops = (out / "ops.txt").read_text()
    assert "optimizer steps 3..4" in ops and "aten::" in ops and "Self CPU" in ops
    assert not (tmp_path / "plain" / "profile").exists()


def test_finished_run_started_again_does_nothing(sample_shards, tmp_path, capsys):
    cfg = small_config(sample_shards, tmp_path, max_steps=3, eval_tokens=0)
    train(cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    summary = train(cfg)
    assert summary["steps"] == 3
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(CheckpointError, match="resume=auto"):
        train(small_config(sample_shards, tmp_path, max_steps=3, resume="never"))


def test_resuming_with_another_seed_is_refused(sample_shards, tmp_path):
    """The loader's sample order depends on the seed, the data and block_size: a resume that
    changes one would silently train on another order. It is a config error found in the
    checkpoint's state.json before any tensor loads (exit 2, which launch/auto_resume.sh does not
    retry), and the run keeps what it had."""
    train(small_config(sample_shards, tmp_path, eval_tokens=0))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000006")  # as if killed after step 3
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="trainer.seed=7; this launch sets trainer.seed=8") as e:
        train(small_config(sample_shards, tmp_path, eval_tokens=0, seed=8))
    assert "step_0000003" in str(e.value) and "trainer.run_name" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000003"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_validation_set_without_a_window_is_a_config_error(sample_shards, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"eval.tokens=10 is below one validation window of "
        r"block_size \+ 1 = 65 tokens",
    ):
        train(small_config(sample_shards, tmp_path, eval_tokens=10))
    assert not (tmp_path / "run").exists()  # found before any work


def test_resume_latest_needs_a_checkpoint(sample_shards, tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(small_config(sample_shards, tmp_path, resume="latest"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tokens_per_step=500), "not divisible"),
        (dict(max_steps=None), "exactly one of"),
        (dict(precision="fp8"), "precision"),
        (dict(compile_mode="fast"), r"compile_mode='fast': use one of \('default', 're"),
    ],
)
def test_impossible_trainer_config_fails_before_any_step(sample_shards, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        train(small_config(sample_shards, tmp_path, **change))
    assert not (tmp_path / "run").exists()


def test_block_size_above_the_model_is_refused(sample_shards, tmp_path):
    cfg = small_config(sample_shards, tmp_path)
    cfg.data.block_size = 128
    with pytest.raises(ConfigError, match="data.block_size=128"):
        train(cfg)


def test_missing_or_mismatched_shards_are_refused(sample_shards, tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        train(small_config(tmp_path / "nowhere", tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(sample_shards, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json is missing"):
        train(small_config(copy, tmp_path))
    shutil.rmtree(copy)
    shutil.copytree(sample_shards, copy)
    shard = sorted(copy.glob("*_train_*.bin"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(ShardError, match=shard.name):
        train(small_config(copy, tmp_path))
    assert not (tmp_path / "run").exists()


def test_evaluate_reports_loss_and_perplexity_of_the_checkpoint(sample_shards, tmp_path):
    train(small_config(sample_shards, tmp_path, max_steps=3, eval_tokens=2048))
    run_dir = tmp_path / "run"
    result = evaluate(EvaluateConfig(checkpoint=str(run_dir), eval_tokens=2048, sample_tokens=8))
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-12)
    assert result["step"] == 3 and result["eval_tokens"] == (2048 - 1) // 64 * 64
    # the same windows as validation during training
    assert result["val_loss"] == pytest.approx(records(run_dir, "val")[-1]["loss"], rel=1e-6)
    # and the same number as a direct computation over those windows
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    model.load_state_dict(final_weights(run_dir))
    windows = ValidationWindows(open_split(sample_shards, "val"), 64, 2048)
    batch = torch.stack([torch.from_numpy(windows.window(i)) for i in range(windows.num_windows)])
    with torch.no_grad():
        logits, _ = model(batch[:, :-1], all_logits=True)  # (B, T, V)
    direct = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert result["val_loss"] == pytest.approx(direct, rel=1e-5)
    saved = json.loads(Path(result["path"]).read_text())
    assert saved["val_loss"] == result["val_loss"]
    assert Path(result["path"]) == run_dir / "eval" / "step_0000003.json"
    with pytest.raises(
        ConfigError,
        match=r"eval_tokens=10 is below one validation window of "
        r"block_size \+ 1 = 65 tokens",
    ):
        evaluate(EvaluateConfig(checkpoint=str(run_dir), eval_tokens=10, sample_tokens=0))
    assert saved == json.loads(Path(result["path"]).read_text())  # the result is kept


def test_command_line_train_then_evaluate(sample_shards, tmp_path):
    common = [f"data.shard_dir={sample_shards}", f"trainer.runs_dir={tmp_path}"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "experiment=demo",
            *common,
            "trainer.max_steps=2",
            "optim.warmup_steps=1",
            "trainer.tokens_per_step=4096",
            "eval.tokens=4096",
            "eval.sample_tokens=4",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    run_dir = tmp_path / "demo"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # the demo's WSD schedule also keeps its last stable step (1 of 2) for a later extension
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000001", "step_0000002"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            f"checkpoint={run_dir}",
            "eval_tokens=4096",
            "sample_tokens=0",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "perplexity" in out and (run_dir / "eval" / "step_0000002.json").is_file()


def test_wandb_offline_logging_and_resume_into_the_same_run(sample_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_config(sample_shards, tmp_path, max_steps=4, eval_tokens=0, checkpoint_interval=1)
    cfg.optim = OptimConfig(
        max_lr=1e-2, min_lr=1e-3, warmup_steps=1, schedule="wsd", decay_fraction=0.25
    )
    cfg.logger = LoggerConfig(kind="wandb", project="test")
    train(cfg)
    run_dir = tmp_path / "run"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    saved_id = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())["wandb_id"]
    assert runs[0].name.endswith(saved_id)
    cfg.trainer.max_steps = 6  # extend the WSD run from step 3: the same W&B run goes on
    train(cfg)
    resumed = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert resumed["step"] == 6 and resumed["wandb_id"] == saved_id


def test_hellaswag_during_training(sample_shards, shared_data, tmp_path):
    items = str(shared_data / "hellaswag/hellaswag_val_klosax.jsonl")
    cfg = small_config(
        sample_shards,
        tmp_path,
        max_steps=2,
        eval_interval=2,
        eval_tokens=1024,
        hellaswag_items=8,
        hellaswag_path=items,
    )
    train(cfg)
    results = records(tmp_path / "run", "hellaswag")
    assert [r["step"] for r in results] == [0, 2]
    assert all(r["n"] == 8 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 for r in results)
