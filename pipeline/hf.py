"""Entry point: `python -m pipeline.hf`. See pipeline.interop.hf_export."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.errors import guard
from pipeline.interop.hf import CONFIG, WEIGHTS
from pipeline.interop.hf_export import export_hf, push_hf


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.hf",
        description="Export checkpoints as Hugging Face GPT2LMHeadModel folders and push them.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write config.json, model.safetensors and the tokenizer")
    ex.add_argument("checkpoint", help="runs/NAME (its newest checkpoint) or a step_* folder")
    ex.add_argument("out_dir", help="folder to write (created)")
    ex.add_argument(
        "--tokenizer-dir",
        help="take OpenAI's encoder.json and vocab.bpe from this folder instead of tiktoken's "
        "gpt2 files (its cache, TIKTOKEN_CACHE_DIR)",
    )
    push = sub.add_parser("push", help="upload an exported folder to a model repo")
    push.add_argument("out_dir", help="a folder written by export")
    push.add_argument("repo_id", help="model repo, USER/NAME (created if missing)")
    push.add_argument("--public", action="store_true", help="create the repo public")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; errors exit through pipeline.errors.guard (`error: ...`, 2)."""
    args = _parser().parse_args(argv)
    if args.command == "export":
        out = export_hf(args.checkpoint, args.out_dir, tokenizer_dir=args.tokenizer_dir)
        print(f"wrote {out / CONFIG}, {out / WEIGHTS} and the GPT-2 tokenizer files")
    else:
        url = push_hf(args.out_dir, args.repo_id, private=not args.public)
        print(f"pushed {args.out_dir}: {url}")


if __name__ == "__main__":
    guard(main)()
