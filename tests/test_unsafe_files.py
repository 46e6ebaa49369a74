"""A checkpoint from elsewhere cannot run code. Real payload files (pickles whose unpickling
calls os.system) planted in real checkpoints, with state.json's sizes and checksums updated as
their author would: every loader (resume, evaluate, sample, export, hub pull, imported weights)
refuses them in one line with exit code 2, and the command they carry never runs. RNG states
are tensors and numbers; the rng.pt files written before that keep loading, and give the same
run."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.proc import run_module
from helpers.runs import final_weights, optimizer_state
from helpers.tiny import tiny_run, train_config
from torch.distributed.checkpoint import FileSystemWriter

from pipeline.errors import USER_ERROR, UnsafeFileError
from pipeline.interop.hub_transfer import install_checkpoint
from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint.folder import (
    MODEL,
    OPTIMIZER,
    RNG,
    STATE,
    checkpoint_dir,
    list_checkpoints,
    load_file,
    load_newest_good,
    model_tensors,
)
from pipeline.training.checkpoint.tensors import METADATA, SafeReader, saved_state, tensor_files
from pipeline.training.loop import train
from pipeline.training.rng import OLD_RNG_GLOBALS, rng_state, set_rng_state

SETTINGS = ("trainer.max_steps=4", "checkpoint.interval=2", "eval.tokens=0", "trainer.seed=7")
"""The trained run: 4 steps, checkpoints at 2 and 4, no validation."""
THEN = (
    "A file this pipeline writes holds only tensors and plain numbers, so this one was altered or "
    "made elsewhere: delete {folder} (a resumed run then continues from the checkpoint before "
    "it) or get the checkpoint from a source you trust"
)


class Payload:
    """Unpickling this calls os.system(`touch <marker>`): the attack the issue reproduced."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def overrides(shards: Path, runs: Path, *extra: str) -> list[str]:
    return tiny_run(shards, runs, "run", *SETTINGS, *extra)


@pytest.fixture(scope="module")
def trained(sample_shards, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    train(train_config(overrides(sample_shards, runs)))
    return runs


@pytest.fixture
def runs(trained, tmp_path) -> Path:
    """A private copy of the trained runs folder, safe to tamper with."""
    return Path(shutil.copytree(trained, tmp_path / "runs"))


def plant(checkpoint: Path, name: str, write) -> Path:
    """Replace checkpoint/name by what write(path) writes and record its size and sha256 in
    state.json, as the author of a hostile checkpoint would."""
    path = checkpoint / name
    write(path)
    state = json.loads((checkpoint / STATE).read_text())
    data = path.read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / STATE).write_text(json.dumps(state))
    return path


def plant_payload(checkpoint: Path, name: str, marker: Path, **save) -> Path:
    return plant(checkpoint, name, lambda p: torch.save({"x": Payload(marker)}, p, **save))


def refusal(path: Path, why: str) -> str:
    return (
        f"error: {path} was refused and nothing in it was run: {why}. "
        + THEN.format(folder=path.parent)
        + "\n"
    )


def assert_refused(done, path: Path, why: str, marker: Path) -> None:
    assert done.returncode == USER_ERROR, done.stderr[-2000:]
    assert done.stderr == refusal(path, why)
    assert not marker.exists()


SYSTEM = "unpickling it would call posix.system, which can run any code"


# --------------------------------------------------------------------------- every loader


def test_resume_refuses_a_planted_rng_file_and_keeps_the_run(runs, sample_shards, tmp_path):
    """The issue's case: rng.pt replaced, the same training command again."""
    marker = tmp_path / "ran"
    step4 = checkpoint_dir(runs / "run", 4)
    path = plant_payload(step4, RNG, marker)
    done = run_module("train", *overrides(sample_shards, runs), timeout=300)
    assert_refused(done, path, SYSTEM, marker)
    assert [p.name for p in list_checkpoints(runs / "run")] == ["step_0000002", "step_0000004"]


@pytest.mark.parametrize(
    "name,write,why",
    [
        (
            OPTIMIZER,
            lambda p, m: torch.save({"x": Payload(m)}, p, pickle_protocol=4),
            "torch cannot check it before loading (Unsupported operand 149)",
        ),
        (
            RNG,
            lambda p, m: p.write_bytes(pickle.dumps({"x": Payload(m)})),
            "it is not a file of torch.save, whose contents can be checked before loading",
        ),
    ],
    ids=["pickle protocol 4", "a plain pickle"],
)
def test_resume_refuses_a_pickle_torch_cannot_scan(runs, tmp_path, name, write, why):
    """Pickle protocol 4 (torch.save writes 2), or a plain pickle file (not torch.save's zip
    format): torch's scan cannot read it, so it is refused rather than loaded. In process, as
    resume calls it (the command line is tested above)."""
    marker = tmp_path / "ran"
    path = plant(checkpoint_dir(runs / "run", 4), name, lambda p: write(p, marker))
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    with pytest.raises(UnsafeFileError) as info:
        load_newest_good(runs / "run", model, [torch.optim.AdamW(model.parameters())])
    assert f"error: {info.value}\n" == refusal(path, why) and not marker.exists()


@pytest.mark.parametrize(
    "module,args",
    [
        ("evaluate", ["eval_tokens=1024", "sample_tokens=0"]),
        ("sample", ["prompt=Hello", "max_new_tokens=4"]),
        ("export", ["checkpoint", "RUN", "OUT", "--format", "hf"]),
    ],
)
def test_evaluate_sample_and_export_refuse_a_planted_model_file(runs, tmp_path, module, args):
    marker = tmp_path / "ran"
    path = plant_payload(checkpoint_dir(runs / "run", 4), MODEL, marker)
    run = str(runs / "run")
    args = [a.replace("RUN", run).replace("OUT", str(tmp_path / "out")) for a in args]
    if module != "export":
        args = [f"checkpoint={run}", *args]
    done = run_module(module, *args, cwd=tmp_path, timeout=300)
    assert_refused(done, path, SYSTEM, marker)
    assert not (tmp_path / "out").exists() and not (runs / "run" / "eval").exists()


def test_a_pulled_checkpoint_with_a_payload_is_not_installed(runs, tmp_path):
    """What `make pull-checkpoint` does once the hub download is staged: install_checkpoint."""
    marker = tmp_path / "ran"
    staged = Path(shutil.copytree(checkpoint_dir(runs / "run", 4), tmp_path / "staged"))
    path = plant_payload(staged, RNG, marker)
    final = checkpoint_dir(tmp_path / "pulled" / "run", 4)
    with pytest.raises(UnsafeFileError) as info:
        install_checkpoint(staged, final, 4)
    assert str(info.value) == (
        f"{path} was refused and nothing in it was run: {SYSTEM}. A file this pipeline writes "
        "holds only tensors and plain numbers, so this one was altered or made elsewhere: it "
        "was not installed and the download was deleted: pull from a repo you trust"
    )
    assert not final.exists() and not staged.exists() and not marker.exists()


def plant_index_payload(checkpoint: Path, marker: Path) -> Path:
    """Replace DCP's index (.metadata) by the same index with a payload among its planner data,
    pickled as DCP pickles it."""

    def write(path: Path) -> None:
        metadata = SafeReader(checkpoint).read_metadata()
        metadata.planner_data = {"x": Payload(marker)}
        path.write_bytes(pickle.dumps(metadata))

    return plant(checkpoint, METADATA, write)


@pytest.mark.parametrize(
    "module,args",
    [
        ("train", []),
        # every loader verifies a checkpoint through the same scan (check_loads_safely):
        pytest.param("evaluate", ["eval_tokens=1024", "sample_tokens=0"], marks=pytest.mark.slow),
        pytest.param("sample", ["prompt=Hello", "max_new_tokens=4"], marks=pytest.mark.slow),
        ("export", ["checkpoint", "RUN", "OUT", "--format", "hf"]),
    ],
)
def test_every_loader_refuses_a_planted_tensor_index(runs, sample_shards, tmp_path, module, args):
    """DCP's index is unpickled (with plain pickle by DCP's own reader): ours refuses anything
    but DCP's metadata classes, before any tensor is read."""
    marker = tmp_path / "ran"
    path = plant_index_payload(checkpoint_dir(runs / "run", 4), marker)
    run = str(runs / "run")
    if module == "train":
        args = overrides(sample_shards, runs)
    elif module == "export":
        args = [a.replace("RUN", run).replace("OUT", str(tmp_path / "out")) for a in args]
    else:
        args = [f"checkpoint={run}", *args]
    done = run_module(module, *args, cwd=tmp_path, timeout=300)
    assert_refused(done, path, SYSTEM, marker)
    assert [p.name for p in list_checkpoints(runs / "run")] == ["step_0000002", "step_0000004"]
    assert not (tmp_path / "out").exists() and not (runs / "run" / "eval").exists()


def test_a_pulled_checkpoint_with_a_planted_index_is_not_installed(runs, tmp_path):
    marker = tmp_path / "ran"
    staged = Path(shutil.copytree(checkpoint_dir(runs / "run", 4), tmp_path / "staged"))
    plant_index_payload(staged, marker)
    final = checkpoint_dir(tmp_path / "pulled" / "run", 4)
    with pytest.raises(UnsafeFileError, match=f"{staged / METADATA} was refused"):
        install_checkpoint(staged, final, 4)
    assert not final.exists() and not staged.exists() and not marker.exists()


def test_resume_refuses_a_planted_value_among_the_tensors(runs, sample_shards, tmp_path):
    """A value DCP stores as a pickle in a process's tensor file (here the learning rate of
    the optimizer's first parameter group) is read weights-only: one line, nothing run."""
    marker = tmp_path / "ran"
    step4 = checkpoint_dir(runs / "run", 4)
    saved = saved_state(step4)
    key = "optimizer.param_groups.0.lr"
    assert isinstance(saved[key], float)
    saved[key] = Payload(marker)
    for name in tensor_files(step4):
        (step4 / name).unlink()
    dcp.save(saved, storage_writer=FileSystemWriter(step4))
    for name in tensor_files(step4):
        plant(step4, name, lambda p: None)  # the sizes and checksums of the new files
    done = run_module("train", *overrides(sample_shards, runs), timeout=300)
    assert done.returncode == USER_ERROR, done.stderr[-2000:]
    assert done.stderr.startswith(
        f"error: {step4 / '__*.distcp'} was refused and nothing in it was run: unpickling its "
        f"value {key} would call more than numbers and strings ("
    ), done.stderr
    assert done.stderr.endswith(THEN.format(folder=step4) + "\n") and not marker.exists()


def test_imported_weights_that_are_a_pickle_are_refused(tmp_path):
    """pretrained=<folder>: model.safetensors is read by safetensors, which runs nothing."""
    marker = tmp_path / "ran"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_layer": 1, "n_head": 1, "n_embd": 8}))
    torch.save({"x": Payload(marker)}, folder / "model.safetensors")
    done = run_module(
        "sample", f"pretrained={folder}", "prompt=Hi", "max_new_tokens=2", cwd=tmp_path
    )
    assert done.returncode == USER_ERROR and not marker.exists()
    files = f"{folder / 'config.json'} / {folder / 'model.safetensors'}"
    assert done.stderr.startswith(f"error: cannot read {files}: "), done.stderr
    assert done.stderr.count("\n") == 1


# --------------------------------------------------------------------------- formats


def test_rng_states_are_tensors_and_numbers_and_restore_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / RNG)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = torch.load(tmp_path / RNG, weights_only=True)  # no allowlist needed
    set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def old_rng_file(new: dict) -> dict:
    """The same states in the layout rng.pt had before (random.getstate() and
    np.random.get_state() tuples, the key a numpy uint32 array)."""
    python = (
        new["python"]["version"],
        tuple(new["python"]["state"].tolist()),
        new["python"]["gauss_next"],
    )
    numpy = (
        new["numpy"]["algorithm"],
        new["numpy"]["key"].numpy().astype(np.uint32),
        new["numpy"]["pos"],
        new["numpy"]["has_gauss"],
        new["numpy"]["cached_gaussian"],
    )
    return {"python": python, "numpy": numpy, "torch": new["torch"]}


def as_numpy_1_wrote_it(path: Path) -> None:
    """Rewrite a torch.save file as numpy 1.x names its array reconstruction in the pickle
    (numpy.core, not numpy._core)."""
    with zipfile.ZipFile(path) as zin:
        entries = [(item, zin.read(item.filename)) for item in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for item, data in entries:
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)


def test_an_rng_file_written_under_numpy_1_restores_the_same_states(tmp_path):
    """numpy 1.x names its array reconstruction numpy.core.multiarray._reconstruct: such an
    rng.pt loads (weights only) and restores the same draws."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / RNG
    torch.save(old_rng_file(rng_state()), path)
    as_numpy_1_wrote_it(path)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_file(path, allow=OLD_RNG_GLOBALS))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_an_rng_file_of_the_earlier_format_resumes_the_same_run(trained, runs, sample_shards):
    """Resume at step 2 from an rng.pt in the earlier layout: the same weights at step 4 as the
    uninterrupted run."""
    shutil.rmtree(checkpoint_dir(runs / "run", 4))
    step2 = checkpoint_dir(runs / "run", 2)
    new = torch.load(step2 / RNG, weights_only=True)
    plant(step2, RNG, lambda p: torch.save(old_rng_file(new), p))
    with pytest.raises(pickle.UnpicklingError):  # it holds a numpy array: not tensors alone
        torch.load(step2 / RNG, weights_only=True)
    done = run_module("train", *overrides(sample_shards, runs), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    expected, resumed = final_weights(trained / "run"), final_weights(runs / "run")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def as_format_1(checkpoint: Path) -> None:
    """Rewrite a checkpoint folder as format 1 (before DCP) wrote it: model.pt, the whole model
    state (the tied lm_head.weight under both names); optimizer.pt, the whole optimizer state
    keyed by parameter name; rng.pt; state.json without "format", listing those three files."""
    model, named = model_tensors(checkpoint), optimizer_state(checkpoint)
    for name in tensor_files(checkpoint):
        (checkpoint / name).unlink()
    torch.save(model, checkpoint / MODEL)
    torch.save(named, checkpoint / OPTIMIZER)
    state = json.loads((checkpoint / STATE).read_text())
    del state["format"]
    state["files"] = {}
    for name in (MODEL, OPTIMIZER, RNG):
        data = (checkpoint / name).read_bytes()
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / STATE).write_text(json.dumps(state))


def test_a_checkpoint_of_the_earlier_format_resumes_the_same_run(trained, runs, sample_shards):
    """Checkpoints written before DCP (model.pt, optimizer.pt) still resume: from step 2 in that
    format, the same weights at step 4 as the uninterrupted run."""
    shutil.rmtree(checkpoint_dir(runs / "run", 4))
    step2 = checkpoint_dir(runs / "run", 2)
    as_format_1(step2)
    assert not list(step2.glob("*.distcp")) and not (step2 / METADATA).exists()
    done = run_module("train", *overrides(sample_shards, runs), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {step2}" in done.stdout
    expected, resumed = final_weights(trained / "run"), final_weights(runs / "run")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    step4 = checkpoint_dir(runs / "run", 4)
    expected_state, resumed_state = (
        optimizer_state(checkpoint_dir(trained / "run", 4)),
        optimizer_state(step4),
    )
    for name, saved in expected_state["state"].items():
        assert all(torch.equal(saved[k], resumed_state["state"][name][k]) for k in saved), name


def test_rng_states_of_the_wrong_kind_are_one_line(runs, sample_shards, tmp_path):
    step4 = checkpoint_dir(runs / "run", 4)
    states = torch.load(step4 / RNG, weights_only=True)
    states["numpy"]["key"] = states["numpy"]["key"][:100]
    path = plant(step4, RNG, lambda p: torch.save(states, p))
    done = run_module(
        "train", *overrides(sample_shards, runs), f"checkpoint.resume={step4}", timeout=300
    )
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        f"error: {path} holds no RNG states this run can restore (ValueError: numpy key of shape "
        f"(100,) is not an MT19937 state); delete {step4} to resume from the checkpoint before "
        "it\n"
    )


@pytest.mark.parametrize(
    "edit,why",
    [
        pytest.param(
            lambda s: s.update(step="4"), "step is '4', not a JSON int", marks=pytest.mark.slow
        ),  # the same check as the other two
        pytest.param(
            lambda s: s["config"].update(model=[1]),
            "config.model is not a JSON object",
            marks=pytest.mark.slow,
        ),
        (
            lambda s: s["files"].update({"../x": {"bytes": 1, "sha256": "0"}}),
            "files lists '../x' without a plain name, its bytes and its sha256",
        ),
    ],
)
def test_a_state_file_of_the_wrong_types_is_one_line(runs, tmp_path, edit, why):
    step4 = checkpoint_dir(runs / "run", 4)
    state = json.loads((step4 / STATE).read_text())
    edit(state)
    (step4 / STATE).write_text(json.dumps(state))
    done = run_module("evaluate", f"checkpoint={step4}", "eval_tokens=1024", cwd=tmp_path)
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        f"error: {step4 / STATE} is not a checkpoint's state ({why}); delete {step4} to resume "
        "from the previous checkpoint\n"
    )
