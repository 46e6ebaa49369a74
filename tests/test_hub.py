"""Hub transfers, offline: file selection, verification, path mapping, refusals, clear errors.

Every test runs without network access. The hub calls themselves are exercised only where they
fail at once: with HF_HUB_OFFLINE=1, or against a closed port on this machine.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from helpers.proc import run_module

from pipeline.data.shards import (
    HEADER_BYTES,
    MANIFEST,
    load_manifest,
    shard_problems,
    verify_shard_folder,
)
from pipeline.errors import USER_ERROR, HubError, ShardError, guard
from pipeline.hub import main as hub_main
from pipeline.interop import hub_transfer as hub
from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint.folder import list_checkpoints, read_state, save_checkpoint

RUN = "tiny_run"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def shard_copy(sample_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared sample folder, same folder name, safe to damage."""
    return Path(shutil.copytree(sample_shards, tmp_path / "copy" / sample_shards.name))


def shard_names(folder: Path) -> list[str]:
    return [entry["file"] for entry in load_manifest(folder)["shards"]]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """A run folder `runs/tiny_run` with real checkpoints of steps 3 and 7 of a 1-layer GPT."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"tokens_seen": 0, "config": {"trainer": {"run_name": RUN}}}
    for step in (3, 7):
        _, written = save_checkpoint(tmp_path / "runs" / RUN, step, model, optimizer, state, 2)
        written.result()
    return tmp_path / "runs"


@pytest.fixture
def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1, also in the constant huggingface_hub read at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_token(monkeypatch, tmp_path: Path) -> None:
    """No token anywhere: no environment variable, no `hf auth login` file."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


@pytest.fixture
def fake_token(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")


@pytest.fixture
def unreachable_hub(monkeypatch) -> None:
    """Online mode, but the hub endpoint is a closed port on this machine: refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")


# --------------------------------------------------------------------------- shards


def test_upload_selection_is_manifest_and_listed_shards_only(shard_copy: Path) -> None:
    names = shard_names(shard_copy)
    assert len(names) >= 3, "the fixture should hold several shards"
    (shard_copy / ".progress.json").write_text("{}")
    (shard_copy / f"{names[-1]}.tmp").write_bytes(b"partial")
    stray = shard_copy / f"{shard_copy.name}_train_999999.bin"  # a valid shard, but not listed
    shutil.copy(shard_copy / names[-1], stray)
    (shard_copy / "notes.txt").write_text("mine")

    files = hub.files_to_upload(shard_copy)

    assert files == [*names, MANIFEST]  # shards in manifest order, the manifest last
    assert {f for f in files} <= {p.name for p in shard_copy.iterdir()}


def test_upload_refuses_unfinished_prepare(shard_copy: Path, offline) -> None:
    (shard_copy / MANIFEST).unlink()  # the prepare stage writes it last
    (shard_copy / ".progress.json").write_text("{}")
    with pytest.raises(HubError, match="not uploading.*prepare stage did not finish"):
        hub.upload_shards(shard_copy, "user/shards")


def test_upload_refuses_corrupt_shard_before_any_hub_call(shard_copy: Path, no_token) -> None:
    """One flipped token byte (size and header intact) is caught by sha256; nothing is sent:
    the refusal comes before the missing token would be noticed."""
    bad = shard_names(shard_copy)[1]
    flip_byte(shard_copy / bad, HEADER_BYTES + 1001)
    with pytest.raises(HubError, match=rf"not uploading(.|\n)*{bad}: sha256 differs"):
        hub.upload_shards(shard_copy, "user/shards")


def test_verify_accepts_a_faithful_copy(sample_shards: Path, shard_copy: Path) -> None:
    assert shard_problems(shard_copy) == {}
    assert verify_shard_folder(shard_copy) == load_manifest(sample_shards)


def test_verify_names_truncated_and_altered_shards(shard_copy: Path) -> None:
    names = shard_names(shard_copy)
    truncated, altered = shard_copy / names[0], shard_copy / names[-1]
    truncated.write_bytes(truncated.read_bytes()[:-2])  # one token short of its header
    flip_byte(altered, altered.stat().st_size - 1)

    assert set(shard_problems(shard_copy)) == {names[0], names[-1]}
    with pytest.raises(ShardError, match="2 shard") as info:
        verify_shard_folder(shard_copy)
    message = str(info.value)
    assert f"{truncated}: " in message and "truncated or corrupt" in message
    assert f"{altered}: sha256 differs" in message
    assert names[1] not in message


def test_verify_rejects_a_manifest_pointing_outside_its_folder(shard_copy: Path) -> None:
    manifest = load_manifest(shard_copy)
    manifest["shards"][0]["file"] = "../elsewhere.bin"
    (shard_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="plain file"):
        verify_shard_folder(shard_copy)


def test_stale_remote_files_and_dataset_names() -> None:
    remote = [
        ".gitattributes",
        "a/manifest.json",
        "a/a_val_000000.bin",
        "a/a_train_000001.bin",
        "a/a_train_000002.bin",  # from an earlier, larger upload of `a`
        "ab/manifest.json",
        "ab/ab_val_000000.bin",
        "b/b_val_000000.bin",  # `b`: shards sent, manifest not yet
    ]
    keep = ["a_val_000000.bin", "a_train_000001.bin", MANIFEST]
    assert hub.stale_remote_files(remote, "a", keep) == ["a/a_train_000002.bin"]
    assert hub.remote_datasets(remote) == ["a", "ab"]


def test_download_leaves_a_complete_folder_alone(shard_copy: Path, offline, capsys) -> None:
    """Works offline: a verified folder needs no hub call at all."""
    before = {p.name: p.stat().st_mtime_ns for p in shard_copy.iterdir()}
    out = hub.download_shards("user/shards", shard_copy.name, shard_copy.parent)
    assert out == shard_copy
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in shard_copy.iterdir()} == before


def test_download_offline_with_nothing_local_says_so(tmp_path: Path, offline) -> None:
    start = time.perf_counter()
    with pytest.raises(HubError, match="offline") as info:
        hub.download_shards("user/shards", "sample", tmp_path / "shards")
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert time.perf_counter() - start < 5


def test_download_offline_keeps_a_damaged_folder_as_it_is(shard_copy: Path, offline) -> None:
    bad = shard_names(shard_copy)[1]
    flip_byte(shard_copy / bad, HEADER_BYTES)
    with pytest.raises(HubError, match="incomplete and HF_HUB_OFFLINE=1"):
        hub.download_shards("user/shards", shard_copy.name, shard_copy.parent)
    assert (shard_copy / bad).exists()


def test_download_refetches_damaged_shards_and_names_what_is_missing(
    shard_copy: Path, unreachable_hub
) -> None:
    """The damaged shard is deleted to be fetched again; with the hub unreachable,
    huggingface_hub keeps the local files, and the check afterwards names the missing one."""
    names = shard_names(shard_copy)
    flip_byte(shard_copy / names[1], HEADER_BYTES)
    with pytest.raises(HubError, match=rf"{names[1]}: shard is missing(.|\n)*network") as info:
        hub.download_shards("user/shards", shard_copy.name, shard_copy.parent)
    assert "1 shard(s)" in str(info.value)
    assert not (shard_copy / names[1]).exists()
    assert all((shard_copy / n).exists() for n in names if n != names[1])


def test_download_rejects_a_path_as_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(HubError, match="plain file or folder name"):
        hub.download_shards("user/shards", "../x", tmp_path)


def test_upload_without_token_says_how_to_log_in(shard_copy: Path, no_token) -> None:
    with pytest.raises(HubError, match="hf auth login.*HF_TOKEN"):
        hub.upload_shards(shard_copy, "user/shards")


def test_upload_offline_says_so(shard_copy: Path, offline, fake_token) -> None:
    with pytest.raises(HubError, match="uploading to dataset repo user/shards.*HF_HUB_OFFLINE"):
        hub.upload_shards(shard_copy, "user/shards")


def test_unreachable_hub_gives_network_errors(
    shard_copy: Path, tmp_path: Path, unreachable_hub, fake_token
) -> None:
    start = time.perf_counter()
    with pytest.raises(HubError, match="network error.*check the connection"):
        hub.upload_shards(shard_copy, "user/shards")
    with pytest.raises(HubError, match="cannot be reached.*network"):
        hub.download_shards("user/shards", "sample", tmp_path / "fresh")
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_paths_map_both_ways(runs_dir: Path, tmp_path: Path) -> None:
    newest = list_checkpoints(runs_dir / RUN)[-1]
    state = read_state(newest)
    repo_path = hub.repo_checkpoint_path(hub.checkpoint_run_name(newest, state), state["step"])
    assert repo_path == f"checkpoints/{RUN}/step_0000007"

    remote = [f"{repo_path}/{name}" for name in hub.checkpoint_files(state)]
    remote += [
        f"checkpoints/{RUN}/step_0000003/state.json",
        f"checkpoints/{RUN}/step_0000009/model.pt",  # push interrupted: no state.json
        "checkpoints/other_run/step_0000020/state.json",
        "README.md",
    ]
    steps = hub.remote_checkpoint_steps(remote, RUN)
    assert steps == [3, 7]
    assert hub.local_checkpoint_path(runs_dir, RUN, hub.choose_step(steps, None, "r")) == newest

    moved = Path(shutil.copytree(newest, tmp_path / "loose_copy"))  # not under <run>/checkpoints
    assert hub.checkpoint_run_name(moved, state) == RUN  # from the config in state.json


def test_checkpoint_files_are_those_saved_state_last(runs_dir: Path) -> None:
    newest = list_checkpoints(runs_dir / RUN)[-1]
    files = hub.checkpoint_files(read_state(newest))
    assert files == [".metadata", "__0_0.distcp", "rng.pt", "state.json"]
    assert sorted(files) == sorted(p.name for p in newest.iterdir())


def test_pulled_checkpoint_is_installed_where_resume_finds_it(
    runs_dir: Path, tmp_path: Path
) -> None:
    """The layout snapshot_download gives (`<staging>/checkpoints/<run>/step_N/`) is moved to
    `<runs_dir>/<run>/checkpoints/step_N/` only when complete: what checkpoint.resume=auto uses."""
    source = list_checkpoints(runs_dir / RUN)[-1]
    fresh = tmp_path / "fresh_runs"
    final = hub.local_checkpoint_path(fresh, RUN, 7)
    staged = final.parent / hub.DOWNLOAD_DIR / hub.repo_checkpoint_path(RUN, 7)
    shutil.copytree(source, staged)
    assert list_checkpoints(fresh / RUN) == []  # the staging folder is never taken for one

    with pytest.raises(HubError, match="state.json says step 7, expected 8"):
        hub.install_checkpoint(staged, hub.local_checkpoint_path(fresh, RUN, 8), 8)
    (staged / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(HubError, match="downloaded checkpoint is incomplete"):
        hub.install_checkpoint(staged, final, 7)
    assert not final.exists()

    shutil.copy(source / "__0_0.distcp", staged / "__0_0.distcp")
    hub.install_checkpoint(staged, final, 7)
    assert list_checkpoints(fresh / RUN) == [final]
    assert read_state(final)["step"] == 7


def test_choose_step() -> None:
    assert hub.choose_step([3, 7], None, "r") == 7
    assert hub.choose_step([3, 7], 3, "r") == 3
    with pytest.raises(HubError, match="no checkpoint of step 5.*\\[3, 7\\]"):
        hub.choose_step([3, 7], 5, "r")
    with pytest.raises(HubError, match="no complete checkpoint"):
        hub.choose_step([], None, "r")


def test_push_refuses_incomplete_checkpoint(runs_dir: Path, no_token) -> None:
    newest = list_checkpoints(runs_dir / RUN)[-1]
    tensors = newest / "__0_0.distcp"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(HubError, match="not pushing.*__0_0.distcp is missing or truncated"):
        hub.push_checkpoint(newest, "user/ckpts")
    (newest / "state.json").unlink()
    with pytest.raises(HubError, match="not a complete checkpoint"):
        hub.push_checkpoint(newest, "user/ckpts")


def test_push_and_pull_offline_say_so(runs_dir: Path, tmp_path: Path, offline, fake_token) -> None:
    newest = list_checkpoints(runs_dir / RUN)[-1]
    with pytest.raises(HubError, match="pushing to model repo user/ckpts.*HF_HUB_OFFLINE"):
        hub.push_checkpoint(newest, "user/ckpts")
    with pytest.raises(HubError, match="pulling from model repo user/ckpts.*HF_HUB_OFFLINE"):
        hub.pull_checkpoint("user/ckpts", RUN, runs_dir=tmp_path / "fresh_runs")


def test_pull_of_a_step_already_here_needs_no_hub(runs_dir: Path, offline, capsys) -> None:
    path = hub.pull_checkpoint("user/ckpts", RUN, 3, runs_dir)
    assert path == runs_dir / RUN / "checkpoints" / "step_0000003"
    assert "already here" in capsys.readouterr().out


def test_pull_will_not_overwrite_a_damaged_local_checkpoint(runs_dir: Path, offline) -> None:
    damaged = runs_dir / RUN / "checkpoints" / "step_0000003"
    (damaged / "rng.pt").unlink()
    with pytest.raises(HubError, match="exists but is damaged.*delete it and pull again"):
        hub.pull_checkpoint("user/ckpts", RUN, 3, runs_dir)


# --------------------------------------------------------------------------- command line


def test_cli_errors_are_one_line_and_exit_2(
    shard_copy: Path, runs_dir: Path, offline, capsys
) -> None:
    (shard_copy / MANIFEST).unlink()
    with pytest.raises(SystemExit) as info:
        guard(hub_main)(["upload-shards", str(shard_copy), "user/shards"])
    assert info.value.code == USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: not uploading") and err.count("\n") == 1

    shutil.rmtree(runs_dir / RUN / "checkpoints")
    with pytest.raises(SystemExit) as info:
        guard(hub_main)(["push-checkpoint", str(runs_dir / RUN), "user/ckpts"])
    assert info.value.code == USER_ERROR
    assert capsys.readouterr().err.startswith("error: no complete checkpoint")


def test_cli_process_exit_status(tmp_path: Path) -> None:
    proc = run_module("hub", "upload-shards", str(tmp_path), "user/shards", timeout=60)
    assert proc.returncode == USER_ERROR
    assert proc.stderr.startswith("error: not uploading")
