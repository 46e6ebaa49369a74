"""Entry point: `python -m pipeline.export checkpoint|push ...`: a checkpoint in the Hugging Face,
the book's or llm.c's format, and an exported folder pushed to the hub. See
pipeline.interop.formats and hf_export."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.errors import ArgumentParser, guard
from pipeline.interop.formats import FORMATS, export
from pipeline.interop.hf_export import push_hf


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m pipeline.export",
        description="Export checkpoints (Hugging Face GPT2LMHeadModel, the book's GPTModel, "
        "llm.c) and push Hugging Face folders.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("checkpoint", help="write a checkpoint in one of the formats")
    ex.add_argument("checkpoint", help="runs/NAME (its newest checkpoint) or a step_* folder")
    ex.add_argument("out_dir", help="folder to write (created)")
    ex.add_argument(
        "--format",
        choices=list(FORMATS),
        default="hf",
        dest="fmt",
        help="hf: config.json + model.safetensors (default); book: config.json + model.pth for "
        "llms_from_scratch.ch04.GPTModel; llmc: model.bin for llm.c",
    )
    ex.add_argument(
        "--tokenizer-dir",
        help="hf only: take OpenAI's encoder.json and vocab.bpe from this folder instead of "
        "tiktoken's gpt2 files (its cache, TIKTOKEN_CACHE_DIR)",
    )
    push = sub.add_parser("push", help="upload an exported folder to a model repo")
    push.add_argument("out_dir", help="a folder written by export")
    push.add_argument("repo_id", help="model repo, USER/NAME (created if missing)")
    push.add_argument("--public", action="store_true", help="create the repo public")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; errors exit through pipeline.errors.guard (`error: ...`, 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        if args.tokenizer_dir is not None and args.fmt != "hf":
            parser.error(f"--tokenizer-dir is for --format hf only, not {args.fmt}")
        paths = export(args.checkpoint, args.out_dir, args.fmt, tokenizer_dir=args.tokenizer_dir)
        tokenizer = " with the GPT-2 tokenizer files" if args.fmt == "hf" else ""
        print("wrote " + " and ".join(str(p) for p in paths) + tokenizer)
    else:
        url = push_hf(args.out_dir, args.repo_id, private=not args.public)
        print(f"pushed {args.out_dir}: {url}")


if __name__ == "__main__":
    guard(main)()
