"""The export formats of `python -m pipeline.export checkpoint --format NAME`, a folder each:

- `hf`: Hugging Face `GPT2LMHeadModel` (config.json, model.safetensors), pipeline.interop.hf_export
- `book`: the book's `GPTModel` (config.json, model.pth), pipeline.interop.book
- `llmc`: llm.c's model file (model.bin), pipeline.interop.llmc
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.errors import OutputError
from pipeline.interop import book, hf_weights, llmc
from pipeline.interop.book import export_book
from pipeline.interop.hf_export import export_hf
from pipeline.interop.llmc import export_llmc
from pipeline.model import GPT

Exporter = Callable[[GPT | torch.nn.Module | str | os.PathLike, str | os.PathLike], Path]

FORMATS: dict[str, tuple[Exporter, tuple[str, ...]]] = {
    "hf": (export_hf, (hf_weights.CONFIG, hf_weights.WEIGHTS)),
    "book": (export_book, (book.CONFIG, book.WEIGHTS)),
    "llmc": (export_llmc, (llmc.WEIGHTS,)),
}
"""Format name -> (its export function, the files it writes; the last is its weights)."""


def _refuse_other_format(out: Path, fmt: str) -> None:
    """Raise OutputError when out already holds the weights of another format: two formats in
    one folder would share config.json, or leave a reader guessing which weights are current."""
    for other, (_, files) in FORMATS.items():
        if other != fmt and (out / files[-1]).is_file():
            raise OutputError(
                f"{out} holds an export in format {other} ({files[-1]}): a {fmt} export there "
                "would mix two formats in one folder; choose another OUT_DIR (e.g. one per format) "
                "or delete that export first"
            )


def export(
    checkpoint_or_model: GPT | torch.nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str = "hf",
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write a GPT (or a checkpoint / run folder's newest checkpoint) into folder out_dir in
    format fmt (a key of FORMATS); tokenizer_dir (OpenAI's encoder.json and vocab.bpe) only
    for hf. Returns the paths written. Raises ValueError (unknown format, tokenizer_dir with
    another format), CheckpointError, HFError or OutputError (out_dir is a file or holds
    another format's export, a failed write: nothing is left half written)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if tokenizer_dir is not None and fmt != "hf":
        raise ValueError(f"tokenizer files are written only with the hf format, not {fmt}")
    out = Path(out_dir)
    _refuse_other_format(out, fmt)
    write, files = FORMATS[fmt]
    extra = {} if tokenizer_dir is None else {"tokenizer_dir": tokenizer_dir}
    write(checkpoint_or_model, out, **extra)
    return [out / name for name in files]
