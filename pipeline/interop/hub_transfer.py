"""Move prepared shards and checkpoints through the Hugging Face hub.

Shards go to a dataset repo, one folder per prepared dataset, named after the local folder:
  <repo>/<name>/<name>_val_000000.bin, <name>_train_000001.bin, ..., <name>/manifest.json
Only the manifest and the shards it lists are sent, each checked first against the manifest
(header, size, token count, sha256), so a damaged local shard is never published. The manifest
is committed after its shards, so a manifest on the hub means its shards are there too. A
download is checked the same way before it is used.

Checkpoints go to a model repo as `checkpoints/<run_name>/step_NNNNNNN/` (the files state.json
lists: DCP's tensors and index, or model.pt and optimizer.pt of format 1, rng.pt; then
state.json); a pull puts one back at
`<runs_dir>/<run_name>/checkpoints/step_NNNNNNN/`, where `checkpoint.resume=auto` finds it.

The pure parts (which files to send, path mapping; the manifest checks are
pipeline.data.shards') are separate from the few huggingface_hub calls; every hub failure
becomes a HubError that says what to do (pipeline.interop.hub_errors). Command line:
`python -m pipeline.hub --help`.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants

from pipeline.data.shards import MANIFEST, listed_shards, shard_problems, verify_shard_folder
from pipeline.errors import CheckpointError, HubError, ShardError, UnsafeFileError
from pipeline.files import is_plain_name
from pipeline.interop.hub_errors import RETRY_HINT, hub_errors, require_token
from pipeline.training.checkpoint.folder import STATE, STEP_DIR, checkpoint_dir, read_state
from pipeline.training.checkpoint.mirror import checkpoint_files
from pipeline.training.checkpoint.mirror import install_checkpoint as install

DOWNLOAD_DIR = ".hub_download"
"""Staging folder of a checkpoint pull, inside `<run>/checkpoints/` (not a `step_*` name)."""


# ----------------------------------------------------------------------- shards: pure logic


def _plain_name(name: str, what: str) -> str:
    """name itself when it is a single path component. Raises HubError otherwise."""
    if not is_plain_name(name):
        raise HubError(f"{what} {name!r} must be a plain file or folder name, without '/'")
    return name


def files_to_upload(shard_dir: str | os.PathLike) -> list[str]:
    """Names (relative to shard_dir) to publish: the listed shards, then manifest.json last.

    Never `.progress.json`, `*.tmp` or files the manifest does not list. Verifies the folder
    first (pipeline.data.shards.verify_shard_folder: reads every byte). Raises ShardError."""
    return [*listed_shards(verify_shard_folder(shard_dir)), MANIFEST]


def stale_remote_files(remote_files: Iterable[str], folder: str, keep: Iterable[str]) -> list[str]:
    """Repo paths under `folder/` that are not `folder/<name>` for a name in keep, sorted: what
    an earlier upload of the same name left that the new one no longer has."""
    wanted = {f"{folder}/{name}" for name in keep}
    return sorted(p for p in remote_files if p.startswith(f"{folder}/") and p not in wanted)


def remote_datasets(remote_files: Iterable[str]) -> list[str]:
    """Names of the datasets a shard repo holds: folders with a top-level manifest.json."""
    return sorted(
        p.split("/")[0] for p in remote_files if p.count("/") == 1 and p.endswith(MANIFEST)
    )


# ------------------------------------------------------------------ checkpoints: pure logic


def checkpoint_run_name(path: str | os.PathLike, state: dict) -> str:
    """Run name of checkpoint folder `path`: from its place `<run>/checkpoints/step_*`, else the
    trainer.run_name recorded in state.json. Raises HubError when neither is there."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints":
        return path.parent.parent.name
    name = state.get("config", {}).get("trainer", {}).get("run_name")
    if not name:
        raise HubError(f"{path}: cannot tell its run name; pass path_in_repo (--path-in-repo)")
    return name


def repo_checkpoint_path(run_name: str, step: int) -> str:
    """Folder of a checkpoint in the model repo: `checkpoints/<run_name>/step_NNNNNNN`."""
    return f"checkpoints/{_plain_name(run_name, 'run name')}/step_{step:07d}"


def local_checkpoint_path(runs_dir: str | os.PathLike, run_name: str, step: int) -> Path:
    """Where a pulled checkpoint goes: `<runs_dir>/<run_name>/checkpoints/step_NNNNNNN`."""
    return checkpoint_dir(Path(runs_dir) / _plain_name(run_name, "run name"), step)


def remote_checkpoint_steps(remote_files: Iterable[str], run_name: str) -> list[int]:
    """Steps of the complete checkpoints (state.json present) of run_name in a repo, ascending."""
    steps = set()
    for p in remote_files:
        parts = p.split("/")
        if len(parts) == 4 and parts[:2] == ["checkpoints", run_name] and parts[3] == STATE:
            match = STEP_DIR.match(parts[2])
            if match:
                steps.add(int(match.group(1)))
    return sorted(steps)


def choose_step(steps: Sequence[int], step: int | None, where: str) -> int:
    """The requested step, or the newest when step is None. Raises HubError when it is absent."""
    if not steps:
        raise HubError(f"{where} has no complete checkpoint: check the repo and run name")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise HubError(f"{where} has no checkpoint of step {step}; it has steps {list(steps)}")
    return step


def install_checkpoint(staged: str | os.PathLike, final: str | os.PathLike, step: int) -> None:
    """Move a downloaded checkpoint folder to `final` (e.g. `runs/<run>/checkpoints/step_N`)
    once it checks out (pipeline.training.checkpoint.mirror.install_checkpoint: sizes, sha256,
    its step, no file that names code to run); `final` appears complete or not at all. Raises
    HubError for an incomplete download or another step, UnsafeFileError for such a file."""
    try:
        install(
            staged,
            final,
            step,
            "it was not installed and the download was deleted: pull from a repo you trust",
        )
    except UnsafeFileError:
        raise
    except CheckpointError as e:
        raise HubError(f"the downloaded checkpoint is incomplete ({e}); {RETRY_HINT}") from None


# --------------------------------------------------------------------------- hub calls


def _publish(
    api: HfApi,
    repo_id: str,
    repo_type: str,
    folder: Path,
    dest: str,
    files: list[str],
    revision: str | None,
) -> str:
    """Upload `files` (names in folder; the last one marks completeness) to `dest/` of the repo:
    all but the last with upload_folder, then the last in a commit that also deletes what an
    earlier upload left under dest/. Returns the commit URL. Raises huggingface_hub errors."""
    *body, last = files
    if body:
        api.upload_folder(
            repo_id=repo_id,
            repo_type=repo_type,
            folder_path=folder,
            path_in_repo=dest,
            allow_patterns=[glob.escape(name) for name in body],
            revision=revision,
            commit_message=f"{dest}: {len(body)} files",
        )
    remote = api.list_repo_files(repo_id, repo_type=repo_type, revision=revision)
    operations = [CommitOperationAdd(f"{dest}/{last}", str(folder / last))]
    operations += [CommitOperationDelete(p) for p in stale_remote_files(remote, dest, files)]
    info = api.create_commit(
        repo_id,
        repo_type=repo_type,
        operations=operations,
        revision=revision,
        commit_message=f"{dest}: {last}",
    )
    return info.commit_url


def prepare_repo(
    api: HfApi, repo_id: str, repo_type: str, private: bool, revision: str | None
) -> None:
    """Create the repo (and branch `revision`) unless it exists. Raises huggingface_hub errors."""
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)


def upload_shards(
    shard_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = True,
    token: str | None = None,
) -> str:
    """Publish a prepared shard folder to dataset repo `repo_id` under `<folder name>/`.

    Checks the folder against its manifest first (reads every byte), creates the
    repo (private by default) and the branch `revision` if missing, uploads the shards, then
    the manifest. Returns the URL of the last commit. Raises HubError: unfinished or damaged
    folder (nothing is sent), no token, or a failed hub call (running again resumes).
    """
    shard_dir = Path(shard_dir)
    try:
        files = files_to_upload(shard_dir)
    except ShardError as e:
        raise HubError(f"not uploading {shard_dir}: {e}") from None
    name = shard_dir.resolve().name
    api = HfApi(token=require_token(token))
    size = sum((shard_dir / f).stat().st_size for f in files)
    print(
        f"uploading {shard_dir}: {len(files) - 1} shards, {size / 1e9:.2f} GB -> {repo_id}/{name}"
    )
    with hub_errors("uploading to", repo_id, "dataset"):
        prepare_repo(api, repo_id, "dataset", private, revision)
        url = _publish(api, repo_id, "dataset", shard_dir, name, files, revision)
    print(f"uploaded {name}: {url}")
    return url


def _local_problems(folder: Path) -> dict[str, str] | None:
    """Shards of a local folder that do not match its manifest ({} = complete), or None when
    there is no readable manifest."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return shard_problems(folder)
    except ShardError as e:
        print(f"{e}; downloading it again")
        return None


def download_shards(
    repo_id: str,
    name: str,
    out_dir: str | os.PathLike = "shards",
    *,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Download dataset `name` of shard repo `repo_id` into `<out_dir>/<name>/` and verify it.

    A folder that already matches its manifest is left alone (no hub call). Damaged local
    shards are deleted and fetched again; an interrupted download resumes. Returns the folder.
    Raises HubError: offline (HF_HUB_OFFLINE=1) or hub unreachable, repo or dataset not found,
    or files that still do not match the manifest (named in the message).
    """
    folder = Path(out_dir) / _plain_name(name, "dataset name")
    problems = _local_problems(folder)
    if problems == {}:
        print(f"{folder} is already complete and matches {MANIFEST}: nothing to download")
        return folder
    if hf_constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{folder} is missing or incomplete and HF_HUB_OFFLINE=1 forbids downloading it "
            "(offline); unset HF_HUB_OFFLINE on a machine with network access"
        )
    for bad, problem in (problems or {}).items():
        print(f"fetching again: {problem}")
        (folder / bad).unlink(missing_ok=True)
    with hub_errors("downloading from", repo_id, "dataset"):
        snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=[f"{glob.escape(name)}/*"],
            local_dir=out_dir,
            token=token,
        )
        if not (folder / MANIFEST).is_file():
            files = HfApi(token=token).list_repo_files(
                repo_id, repo_type="dataset", revision=revision
            )
            raise HubError(
                f"dataset repo {repo_id} has no {name}/{MANIFEST} (its upload did not finish, or "
                f"the name is wrong); datasets there: {remote_datasets(files) or 'none'}"
            )
    try:
        verify_shard_folder(folder)
    except ShardError as e:
        raise HubError(
            f"{folder} does not match its manifest after the download: {e}\nIf the hub could "
            "not be reached, the files on disk were kept as they were: check the network and "
            "run the same command again"
        ) from None
    print(f"downloaded and verified {folder}")
    return folder


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    token: str | None = None,
    private: bool = True,
) -> str:
    """Upload one complete checkpoint folder to model repo `repo_id`, under
    `checkpoints/<run_name>/step_NNNNNNN/` unless path_in_repo is given; state.json goes last.

    Returns the URL of the last commit. Raises HubError: incomplete checkpoint (read_state
    fails; nothing is sent), no token, or a failed hub call (running again resumes).
    """
    path = Path(checkpoint_dir)
    try:
        state = read_state(path)
    except CheckpointError as e:
        raise HubError(f"not pushing {path}: {e}") from None
    dest = path_in_repo or repo_checkpoint_path(checkpoint_run_name(path, state), state["step"])
    api = HfApi(token=require_token(token))
    print(f"pushing {path} -> {repo_id}/{dest}")
    with hub_errors("pushing to", repo_id, "model"):
        prepare_repo(api, repo_id, "model", private, None)
        url = _publish(api, repo_id, "model", path, dest.strip("/"), checkpoint_files(state), None)
    print(f"pushed {dest}: {url}")
    return url


def _complete_checkpoint(path: Path) -> bool:
    """Whether a local step folder is a complete checkpoint. Raises HubError for a damaged one
    (it is not replaced, so that no file is lost without the user deciding)."""
    if not path.exists():
        return False
    try:
        read_state(path)
    except CheckpointError as e:
        raise HubError(f"{path} exists but is damaged ({e}); delete it and pull again") from None
    return True


def _already_here(path: Path) -> Path:
    print(f"{path} is already here and complete: nothing to pull")
    return path


def pull_checkpoint(
    repo_id: str,
    run_name: str,
    step: int | None = None,
    runs_dir: str | os.PathLike = "runs",
    *,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Download checkpoint `step` (default: the newest) of run_name from model repo `repo_id`
    to `<runs_dir>/<run_name>/checkpoints/step_NNNNNNN/`, where `checkpoint.resume=auto` finds it.

    The files land in `<run>/checkpoints/.hub_download/` first and the folder is renamed into
    place only after read_state accepts it. A checkpoint already present is left alone.
    Returns the checkpoint folder. Raises HubError (not found, hub unreachable, incomplete).
    """
    if step is not None and _complete_checkpoint(local_checkpoint_path(runs_dir, run_name, step)):
        return _already_here(local_checkpoint_path(runs_dir, run_name, step))
    with hub_errors("pulling from", repo_id, "model"):
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    step = choose_step(remote_checkpoint_steps(files, run_name), step, f"{repo_id} run {run_name}")
    final = local_checkpoint_path(runs_dir, run_name, step)
    if _complete_checkpoint(final):
        return _already_here(final)
    staging = final.parent / DOWNLOAD_DIR
    source = repo_checkpoint_path(run_name, step)
    with hub_errors("pulling from", repo_id, "model"):
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[f"{glob.escape(source)}/*"],
            local_dir=staging,
            token=token,
        )
    install_checkpoint(staging / source, final, step)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"pulled {repo_id}/{source} -> {final}")
    return final


# --------------------------------------------------------------------------- command line
