"""Entry point: `python -m pipeline.hub`. See pipeline.interop.hub_transfer."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.errors import ArgumentParser, guard
from pipeline.interop.hub_errors import LOGIN_HINT
from pipeline.interop.hub_transfer import (
    download_shards,
    pull_checkpoint,
    push_checkpoint,
    upload_shards,
)
from pipeline.training.checkpoint.folder import resolve_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m pipeline.hub",
        description="Move prepared shards and checkpoints through the Hugging Face hub. "
        f"Uploads need a token with write access: {LOGIN_HINT}.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload-shards", help="publish a prepared shard folder (verified first)")
    up.add_argument("shard_dir", help="e.g. shards/fineweb_sample_10bt")
    up.add_argument("repo_id", help="dataset repo, USER/NAME (created if missing)")
    up.add_argument("--revision", help="branch to upload to (created if missing)")
    up.add_argument("--public", action="store_true", help="create the repo public")
    down = sub.add_parser("download-shards", help="download and verify a shard folder")
    down.add_argument("repo_id", help="dataset repo, USER/NAME")
    down.add_argument("name", help="dataset folder in the repo, e.g. fineweb_sample_10bt")
    down.add_argument("--out-dir", default="shards", help="parent folder (default: shards)")
    down.add_argument("--revision", help="branch, tag or commit")
    push = sub.add_parser("push-checkpoint", help="upload a complete checkpoint")
    push.add_argument("checkpoint", help="runs/NAME (its newest checkpoint) or a step_* folder")
    push.add_argument("repo_id", help="model repo, USER/NAME (created if missing)")
    push.add_argument("--path-in-repo", help="default: checkpoints/<run_name>/step_NNNNNNN")
    push.add_argument("--public", action="store_true", help="create the repo public")
    pull = sub.add_parser("pull-checkpoint", help="download a checkpoint to resume from")
    pull.add_argument("repo_id", help="model repo, USER/NAME")
    pull.add_argument("run_name", help="run name (folder under --runs-dir)")
    pull.add_argument("--step", type=int, help="optimizer step (default: the newest)")
    pull.add_argument("--runs-dir", default="runs", help="default: runs")
    pull.add_argument("--revision", help="branch, tag or commit")
    return p


def run(args: argparse.Namespace) -> None:
    """Carry out one parsed command. Raises HubError, ShardError or CheckpointError."""
    if args.command == "upload-shards":
        upload_shards(args.shard_dir, args.repo_id, revision=args.revision, private=not args.public)
    elif args.command == "download-shards":
        download_shards(args.repo_id, args.name, args.out_dir, revision=args.revision)
    elif args.command == "push-checkpoint":
        push_checkpoint(
            resolve_checkpoint(args.checkpoint),
            args.repo_id,
            path_in_repo=args.path_in_repo,
            private=not args.public,
        )
    else:
        pull_checkpoint(
            args.repo_id, args.run_name, args.step, args.runs_dir, revision=args.revision
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; errors exit through pipeline.errors.guard (`error: ...`, 2)."""
    run(_parser().parse_args(argv))


if __name__ == "__main__":
    guard(main)()
