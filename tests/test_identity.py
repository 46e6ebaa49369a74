"""Nothing silently wrong with the data: checkpoints and results record the data they used
(absolute shard folder, manifest fingerprint), evaluation and resume refuse other data unless
told, the loader reads exactly the shards its manifest lists, a resume with another model,
block size or seed stops before loading tensors, and validation windows are checked like
training batches. Every refusal is one line `error: ...` and exit code 2 from the command, and
keeps what was there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.proc import run_module
from helpers.tiny import small_config, tiny_run, train_config

from pipeline.config import EvaluateConfig
from pipeline.data.loader import ValidationWindows
from pipeline.data.shards import HEADER_BYTES, manifest_fingerprint, open_split
from pipeline.errors import CheckpointError, ConfigError, ShardError
from pipeline.evaluation.tasks import evaluate
from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint.folder import list_checkpoints, load_checkpoint
from pipeline.training.loop import train

VOCAB = 50257
STEPS = ["trainer.max_steps=2", "checkpoint.interval=1", "eval.tokens=0", "trainer.seed=7"]
"""The settings of the `trained` run, as command-line overrides."""


# --------------------------------------------------------------------------- helpers


def edit_manifest(shard_dir: Path, edit) -> dict:
    """Apply edit(manifest) to shard_dir's manifest.json on disk; returns the edited one."""
    path = shard_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def other_data(src: Path, dst: Path) -> Path:
    """A copy of src without its last train shard: a consistent, different dataset."""
    shutil.copytree(src, dst)

    def drop_last(manifest):
        last = manifest["shards"].pop()
        assert last["split"] == "train"
        (dst / last["file"]).unlink()
        manifest["splits"]["train"]["tokens"] -= last["tokens"]
        manifest["splits"]["train"]["shards"] -= 1

    edit_manifest(dst, drop_last)
    return dst


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def fails(module: str, *args: str, cwd: Path) -> str:
    """Run `python -m pipeline.<module> args` and check it failed as a user error: exit code 2
    and one line `error: ...` on stderr; returns that line."""
    done = run_module(module, *args, cwd=cwd, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_shards) -> Path:
    """A 2-step tiny run with a checkpoint after each step, trained from the folder `home`
    with the relative data.shard_dir=shards/demo (a copy of the sample shards). Read-only:
    tests copy it (run_copy) before changing anything."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(sample_shards, home / "shards" / "demo")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        train(
            small_config(
                Path("shards/demo"),
                home / "runs",
                max_steps=2,
                eval_tokens=0,
                checkpoint_interval=1,
            )
        )
    finally:
        os.chdir(cwd)
    return home / "runs" / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run (runs/run under tmp_path) that a test may resume or edit."""
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


@pytest.fixture
def shards(trained) -> Path:
    """The trained run's data (absolute). Read-only."""
    return trained.parent.parent / "shards" / "demo"


# --------------------------------------------------------------------------- item 2: evaluation


def test_checkpoint_records_the_absolute_folder_and_fingerprint(trained, shards):
    state = state_of(list_checkpoints(trained)[-1])
    assert state["config"]["data"]["shard_dir"] == "shards/demo"  # as given, relative
    assert state["data"] == {
        "shard_dir": str(shards.resolve()),
        "manifest_fingerprint": manifest_fingerprint(shards),
    }
    assert len(state["data"]["manifest_fingerprint"]) == 64


def test_evaluate_from_another_folder_scores_the_data_it_was_trained_on(
    run_copy, shards, tmp_path, monkeypatch
):
    """Another folder holding a different shards/demo: the recorded absolute folder wins."""
    other_data(shards, tmp_path / "shards" / "demo")
    monkeypatch.chdir(tmp_path)
    result = evaluate(EvaluateConfig(checkpoint=str(run_copy), eval_tokens=2048, sample_tokens=0))
    assert result["shard_dir"] == str(shards.resolve())
    assert result["manifest_fingerprint"] == manifest_fingerprint(shards)
    assert result["eval_tokens"] == 31 * 64 and result["windows"] == 31
    saved = json.loads(Path(result["path"]).read_text())
    assert {
        k: saved[k] for k in ("shard_dir", "manifest_fingerprint", "eval_tokens", "windows")
    } == {k: result[k] for k in ("shard_dir", "manifest_fingerprint", "eval_tokens", "windows")}


def test_evaluate_refuses_changed_data_and_keeps_the_result(run_copy, shards, tmp_path):
    """The recorded folder now holds other data: exit 2 naming both, the result untouched."""
    ok = evaluate(EvaluateConfig(checkpoint=str(run_copy), eval_tokens=2048, sample_tokens=0))
    before = Path(ok["path"]).read_bytes()
    original = tmp_path / "original"
    shards.rename(original)
    try:
        other_data(original, shards)
        line = fails("evaluate", f"checkpoint={run_copy}", "eval_tokens=2048", cwd=tmp_path)
    finally:
        shutil.rmtree(shards)
        original.rename(shards)
    fingerprint = manifest_fingerprint(shards)
    assert f"was trained on {shards.resolve()} (manifest fingerprint {fingerprint[:12]})" in line
    assert f"{shards.resolve()} holds other data" in line and "shard_dir=" in line
    assert Path(ok["path"]).read_bytes() == before


def test_explicit_shard_dir_is_scored_and_recorded(run_copy, shards, tmp_path, monkeypatch):
    other = other_data(shards, tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    result = evaluate(
        EvaluateConfig(
            checkpoint=str(run_copy), shard_dir="other", eval_tokens=2048, sample_tokens=0
        )
    )
    assert result["shard_dir"] == str(other.resolve())
    assert result["manifest_fingerprint"] == manifest_fingerprint(other)
    assert result["manifest_fingerprint"] != manifest_fingerprint(shards)


def test_checkpoint_without_data_identity_evaluates_as_before(run_copy, shards, monkeypatch):
    """Older checkpoints record no data: their data.shard_dir, from the working directory."""
    for checkpoint in list_checkpoints(run_copy):
        state = state_of(checkpoint)
        del state["data"]
        (checkpoint / "state.json").write_text(json.dumps(state))
    monkeypatch.chdir(shards.parent.parent)
    result = evaluate(EvaluateConfig(checkpoint=str(run_copy), eval_tokens=2048, sample_tokens=0))
    assert result["shard_dir"] == str(shards.resolve()) and result["windows"] == 31


# --------------------------------------------------------------------------- item 3: manifest


@pytest.fixture
def shard_copy(shards, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def test_shard_removed_from_the_manifest_is_named(shard_copy, tmp_path):
    removed = edit_manifest(shard_copy, lambda m: m["shards"].pop())
    name = sorted(shard_copy.glob("*_train_*.bin"))[-1].name
    assert name not in [s["file"] for s in removed["shards"]]
    with pytest.raises(ShardError, match=f"{name}: a shard file that manifest.json does not list"):
        open_split(shard_copy, "train")
    line = fails("train", *tiny_run(shard_copy, tmp_path / "runs", "run", *STEPS), cwd=tmp_path)
    assert name in line and "manifest.json does not list" in line
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


def test_train_shard_relabelled_as_validation_is_named(shard_copy):
    def relabel(manifest):
        manifest["shards"][1]["split"] = "val"  # the first train shard

    name = edit_manifest(shard_copy, relabel)["shards"][1]["file"]
    for split in ("val", "train"):  # neither split may read it
        with pytest.raises(ShardError, match=f"{name}: a 'train' shard that manifest.json lists"):
            open_split(shard_copy, split)


def test_split_totals_must_match_the_manifest(shard_copy):
    def inflate(manifest):
        manifest["splits"]["val"]["tokens"] += 1

    n = edit_manifest(shard_copy, inflate)["splits"]["val"]["tokens"] - 1
    with pytest.raises(
        ShardError,
        match=f"manifest.json: its 'val' shards hold {n:,} tokens but "
        f"its splits.val.tokens records {n + 1:,}",
    ):
        open_split(shard_copy, "val")
    assert open_split(shard_copy, "train").num_tokens > 0  # the other split is intact


# --------------------------------------------------------------------------- item 4: resume data


def test_resume_on_other_data_is_refused_naming_both(run_copy, shards, tmp_path):
    other = other_data(shards, tmp_path / "other")
    before = {p.name: state_of(p) for p in list_checkpoints(run_copy)}
    runs = run_copy.parent
    with pytest.raises(ConfigError) as e:
        train(small_config(other, runs, max_steps=2, eval_tokens=0, checkpoint_interval=1))
    message = str(e.value)
    assert f"was trained on {shards.resolve()} (manifest fingerprint " in message
    assert f"this launch reads {other.resolve()} (fingerprint " in message
    assert manifest_fingerprint(other)[:12] in message and "data.allow_other_data=true" in message
    assert {p.name: state_of(p) for p in list_checkpoints(run_copy)} == before
    line = fails("train", *tiny_run(other, runs, "run", *STEPS), cwd=tmp_path)
    assert "data.allow_other_data=true" in line and str(other.resolve()) in line


def test_allow_other_data_continues_on_the_new_data(run_copy, shards, tmp_path, capsys):
    other = other_data(shards, tmp_path / "other")
    shutil.rmtree(run_copy / "checkpoints" / "step_0000002")  # continue from step 1
    cfg = small_config(other, run_copy.parent, max_steps=2, eval_tokens=0, checkpoint_interval=1)
    cfg.data.allow_other_data = True
    assert train(cfg)["steps"] == 2
    assert "note: continuing on other data" in capsys.readouterr().out
    data = state_of(run_copy / "checkpoints" / "step_0000002")["data"]
    assert data == {
        "shard_dir": str(other.resolve()),
        "manifest_fingerprint": manifest_fingerprint(other),
    }


def test_checkpoint_without_data_identity_resumes_as_before(run_copy, shards):
    shutil.rmtree(run_copy / "checkpoints" / "step_0000002")
    step1 = run_copy / "checkpoints" / "step_0000001"
    state = state_of(step1)
    del state["data"]
    (step1 / "state.json").write_text(json.dumps(state))
    cfg = small_config(shards, run_copy.parent, max_steps=2, eval_tokens=0, checkpoint_interval=1)
    assert train(cfg)["steps"] == 2


# --------------------------------------------------------------------------- item 5: resume config


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ["model.n_layer=3"],
            "trained with model.n_layer=2; this launch sets model.n_layer=3: "
            "resume with model.n_layer=2",
        ),
        (
            ["model.n_embd=64", "model.n_head=4"],
            "trained with model.n_head=2, model.n_embd=32; "
            "this launch sets model.n_head=4, model.n_embd=64",
        ),
        (
            ["data.block_size=32"],
            "trained with data.block_size=64; this launch sets data.block_size=32",
        ),
    ],
)
def test_resume_with_another_model_stops_before_loading(run_copy, shards, change, message):
    before = {p.name: state_of(p) for p in list_checkpoints(run_copy)}
    cfg = train_config(tiny_run(shards, run_copy.parent, "run", *STEPS, *change))
    with pytest.raises(ConfigError, match=message) as e:
        train(cfg)
    assert "step_0000002" in str(e.value) and "another trainer.run_name" in str(e.value)
    assert {p.name: state_of(p) for p in list_checkpoints(run_copy)} == before


def test_resume_with_another_model_from_the_command_line(run_copy, shards, tmp_path):
    args = tiny_run(shards, run_copy.parent, "run", *STEPS, "model.n_layer=3")
    line = fails("train", *args, cwd=tmp_path)
    assert "model.n_layer=2; this launch sets model.n_layer=3" in line


def test_weights_of_another_size_are_one_checkpoint_error(trained):
    bigger = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    with pytest.raises(CheckpointError, match="does not fit this model: .*[Ss]ize mismatch") as e:
        load_checkpoint(list_checkpoints(trained)[-1], bigger, restore_rng=False)
    assert "\n" not in str(e.value) and len(str(e.value)) < 1000


def test_evaluating_a_checkpoint_whose_config_lies_is_one_line(run_copy, tmp_path):
    step2 = run_copy / "checkpoints" / "step_0000002"
    state = state_of(step2)
    state["config"]["model"]["n_embd"] = 64
    (step2 / "state.json").write_text(json.dumps(state))
    line = fails("evaluate", f"checkpoint={run_copy}", "eval_tokens=2048", cwd=tmp_path)
    assert f"{step2} does not fit this model" in line and "ize mismatch" in line


# --------------------------------------------------------------------------- item 6: ids


def test_validation_ids_above_the_vocabulary_name_the_shard(shard_copy, tmp_path):
    val = sorted(shard_copy.glob("*_val_*.bin"))[0]
    with open(val, "r+b") as f:  # same size and header: only the contents are wrong
        f.seek(HEADER_BYTES + 2 * 100)
        f.write(b"\x60\xea")  # token id 60000 >= vocab_size 50257
    windows = ValidationWindows(open_split(shard_copy, "val"), 64, 2048, VOCAB)
    windows.window(0)  # tokens 0..64
    with pytest.raises(
        ShardError,
        match=f"{val.name}: token id 60000 at tokens 64..128 is not below vocab_size 50257",
    ):
        windows.window(1)
    with pytest.raises(ShardError, match=f"{val.name}: token id 60000"):
        train(small_config(shard_copy, tmp_path, max_steps=2, eval_tokens=2048))
    assert not list_checkpoints(tmp_path / "run")  # refused at the baseline, before step 1


def test_evaluate_on_a_corrupt_validation_shard_is_one_line(run_copy, shard_copy, tmp_path):
    val = sorted(shard_copy.glob("*_val_*.bin"))[0]
    with open(val, "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(b"\xff\xff")  # token id 65535
    args = [f"checkpoint={run_copy}", f"shard_dir={shard_copy}", "eval_tokens=2048"]
    line = fails("evaluate", *args, cwd=tmp_path)
    assert f"{val}: token id 65535 at tokens 0..64 is not below vocab_size 50257" in line
    assert not (run_copy / "eval").exists()


# --------------------------------------------------------------------------- item 8: eval tokens


def test_eval_tokens_below_one_window_is_a_config_error(shards, tmp_path):
    cfg = small_config(shards, tmp_path, eval_tokens=64)
    assert cfg.problems() == [
        "eval.tokens=64 is below one validation window of block_size + 1 = 65 tokens: set "
        "eval.tokens >= 65, or eval.tokens=0 for no validation"
    ]
    assert small_config(shards, tmp_path, eval_tokens=65).problems() == []
    assert small_config(shards, tmp_path, eval_tokens=0).problems() == []
    # evaluate: with block_size given, before the checkpoint is even looked at
    cfg = EvaluateConfig(checkpoint=str(tmp_path / "nowhere"), block_size=64, eval_tokens=64)
    with pytest.raises(
        ConfigError,
        match=r"eval_tokens=64 is below one validation window of "
        r"block_size \+ 1 = 65 tokens: set eval_tokens >= 65",
    ):
        evaluate(cfg)


@pytest.mark.slow
def test_eval_tokens_below_one_window_from_the_command_line(trained, tmp_path):
    line = fails("evaluate", f"checkpoint={trained}", "eval_tokens=10", cwd=tmp_path)
    assert line == (
        "error: invalid configuration: eval_tokens=10 is below one validation window of "
        "block_size + 1 = 65 tokens: set eval_tokens >= 65, or null for the whole validation split"
    )
    args = tiny_run(tmp_path / "nowhere", tmp_path, "run", "trainer.max_steps=2", "eval.tokens=10")
    line = fails("train", *args, cwd=tmp_path)
    assert "eval.tokens=10 is below one validation window of block_size + 1 = 65" in line
    assert (
        not list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "metrics.jsonl").exists()
    )
