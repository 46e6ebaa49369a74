"""The error model (pipeline.errors) and the atomic writer (pipeline.files), on real files and
real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.paths import REPO
from helpers.proc import run_module

from pipeline.config import RENAMED
from pipeline.config.cli import check_command_line
from pipeline.errors import (
    DIVERGED,
    INTERRUPTED,
    USER_ERROR,
    CheckpointError,
    ConfigError,
    NumericsError,
    ShardError,
    guard,
)
from pipeline.files import (
    atomic_dir,
    atomic_path,
    is_plain_name,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)


def run_guarded(capsys, error: BaseException) -> tuple[int, str]:
    """Exit code and stderr of a guarded function raising `error`."""

    @guard
    def entry() -> None:
        raise error

    with pytest.raises(SystemExit) as info:
        entry()
    return info.value.code, capsys.readouterr().err


def test_guard_prints_one_line_with_the_exit_code_of_the_error(capsys):
    code, err = run_guarded(capsys, ShardError("shards/x is missing: run prepare first"))
    assert (code, err) == (USER_ERROR, "error: shards/x is missing: run prepare first\n")
    code, err = run_guarded(capsys, ConfigError(["a=1 must be >= 2", "b: use c"]))
    assert (code, err) == (USER_ERROR, "error: invalid configuration: a=1 must be >= 2; b: use c\n")
    code, err = run_guarded(capsys, CheckpointError("step_1 is damaged:\n  delete it"))
    assert (code, err) == (USER_ERROR, "error: step_1 is damaged: delete it\n")
    code, err = run_guarded(capsys, NumericsError("5 steps in a row had a non-finite loss"))
    assert (code, err) == (DIVERGED, "error: 5 steps in a row had a non-finite loss\n")
    code, err = run_guarded(capsys, KeyboardInterrupt())
    assert (code, err) == (INTERRUPTED, "interrupted: run the same command to continue\n")


def test_guard_lets_bugs_through_as_tracebacks():
    @guard
    def entry() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        entry()


def test_user_errors_keep_their_builtin_bases():
    """Callers catching ValueError or RuntimeError, as before the one error model, still do."""
    assert isinstance(ConfigError("x"), ValueError)
    assert isinstance(ShardError("x"), RuntimeError) and isinstance(
        CheckpointError("x"), RuntimeError
    )


def test_renamed_keys_name_their_new_key():
    assert check_command_line("train", ["trainer.max_steps=3", "optim=muon"], RENAMED) is not None
    with pytest.raises(ConfigError) as info:
        check_command_line("train", ["trainer.eval_interval=5", "+trainer.keep_last=2"], RENAMED)
    assert info.value.problems == [
        "trainer.eval_interval was renamed to eval.interval: write eval.interval=5",
        "trainer.keep_last was renamed to checkpoint.keep_last: write checkpoint.keep_last=2",
    ]
    assert all(
        new.split(".")[0] in ("eval", "checkpoint", "runtime", "profile")
        for new in RENAMED.values()
    )


def test_an_old_key_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    done = run_module("train", "experiment=demo", "trainer.compile=false", cwd=tmp_path)
    assert done.returncode == USER_ERROR
    assert done.stderr == (
        "error: invalid configuration: trainer.compile was renamed to runtime.compile: "
        "write runtime.compile=false\n"
    )
    assert not (tmp_path / "runs").exists()


def test_the_training_entry_point_loads_no_export_hub_or_evaluation_stage():
    """A training process (pipeline.train and the training loop it imports once the command
    line checks out) stays clear of the Hugging Face export and hub code, `datasets` and the
    evaluation stage. (safetensors comes with accelerate itself, which imports it.)"""
    code = (
        "import sys, pipeline.train, pipeline.training.loop; "
        "print(sorted({m.split('.')[0] if not m.startswith('pipeline') else m "
        "for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = set(eval(done.stdout))
    assert "pipeline.training.loop" in loaded
    banned_modules = [
        "huggingface_hub",
        "datasets",
        "pipeline.interop",
        "pipeline.evaluate",
        "pipeline.interop.hf_weights",
        "pipeline.interop.hub_transfer",
        "pipeline.evaluation.tasks",
        "pipeline.tools",
    ]
    for banned in banned_modules:
        assert banned not in loaded, banned


# --------------------------------------------------------------------------- files


def test_atomic_path_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    write_json_atomic(target, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="unexpected pos"):  # as torch's zip writer fails
        with atomic_path(target) as tmp:
            tmp.write_text('{"loss": 2')
            raise RuntimeError("unexpected pos 123")
    assert json.loads(target.read_text()) == {"loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    write_text_atomic(target, "{}\n")
    assert target.read_text() == "{}\n" and sorted(os.listdir(tmp_path)) == ["result.json"]


def test_atomic_dir_is_complete_or_absent(tmp_path):
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in final.iterdir()] == ["config.json"]
    with pytest.raises(OSError):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert [p.name for p in final.iterdir()] == ["config.json"]  # the earlier one, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_sha256_and_plain_names(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 "abc"
    )
    assert is_plain_name("fineweb_sample_10bt")
    assert not any(map(is_plain_name, ["", ".", "..", "a/b", "a\\b"]))
