"""A checkpoint (or a GPT) written as a Hugging Face `GPT2LMHeadModel` folder, and that folder
pushed to a model repo. The conversion itself is pipeline.interop.hf.

Command line (pipeline/hf.py):
  python -m pipeline.hf export runs/NAME[/checkpoints/step_NNNNNNN] OUT_DIR [--tokenizer-dir D]
  python -m pipeline.hf push OUT_DIR USER/REPO [--public]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import HfApi
from safetensors import SafetensorError
from safetensors.torch import save_file

from pipeline.errors import HFError
from pipeline.files import atomic_path, make_folder, write_failed
from pipeline.interop.hf import CONFIG, WEIGHTS, hf_config, to_hf_state_dict
from pipeline.interop.hub import prepare_repo
from pipeline.interop.hub_errors import hub_errors, require_token
from pipeline.model import GPT
from pipeline.training.checkpoint import load_model
from pipeline.training.runtime import unwrap_model

TOKENIZER_FILES = {"vocab.json": ("encoder.json", "vocab.json"), "merges.txt": ("vocab.bpe",)}
"""HF file name -> the names it has in OpenAI's release (encoder.json, vocab.bpe) or HF's."""
TOKENIZER_CONFIG = "tokenizer_config.json"

Writer = Callable[[Path], None]
"""Writes one file at the path it is given."""


def model_of(source: GPT | torch.nn.Module | str | os.PathLike) -> GPT:
    """The GPT of a model (also compiled or DDP-wrapped), a checkpoint folder or a run folder
    (its newest checkpoint). Raises CheckpointError, or HFError for a module that is no GPT."""
    if isinstance(source, torch.nn.Module):
        try:
            return unwrap_model(source)
        except TypeError as e:
            raise HFError(str(e)) from None
    model, _, _ = load_model(source)
    return model


def tokenizer_writers(tokenizer_dir: str | os.PathLike, max_length: int) -> dict[str, Writer]:
    """Writers of the GPT-2 tokenizer files of HF's GPT2Tokenizer (vocab.json, merges.txt,
    tokenizer_config.json), by file name, from OpenAI's encoder.json and vocab.bpe (or HF's
    names) in tokenizer_dir. Raises HFError when they are missing."""
    src = Path(tokenizer_dir)
    writers: dict[str, Writer] = {}
    for target, names in TOKENIZER_FILES.items():
        found = next((src / n for n in names if (src / n).is_file()), None)
        if found is None:
            raise HFError(f"{src} has none of {', '.join(names)}: pass the GPT-2 tokenizer files")
        writers[target] = lambda tmp, f=found: shutil.copyfile(f, tmp)
    special = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
        "add_prefix_space": False,
        "add_bos_token": False,
    }
    writers[TOKENIZER_CONFIG] = lambda tmp: tmp.write_text(json.dumps(config))
    return writers


def write_all(out: Path, writers: dict[str, Writer]) -> None:
    """Write every file of `writers` (name -> writer) into folder out (created), all or none:
    each is written under its temporary name (pipeline.files.atomic_path) and renamed into
    place only once every one is written. On any failure the temporary files are removed and
    out keeps the files it had; a failed write (a full disk) raises OutputError, as does an out
    that cannot be a folder (a file)."""
    make_folder(out, "export folder", "OUT_DIR")
    try:
        with contextlib.ExitStack() as stack:
            for name, write in writers.items():
                write(stack.enter_context(atomic_path(out / name)))
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors: its own error class
        raise write_failed(out, e, f"no partial file is left and {out} holds what it held "
                           "before: free disk space and run the export again") from e  # fmt: skip


def export_hf(
    checkpoint_or_model: GPT | torch.nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a GPT (or a checkpoint / run folder's newest checkpoint) as a GPT2LMHeadModel
    folder: config.json and model.safetensors (float32, vocabulary cut to vocab_size, tied
    lm_head stored once as `transformer.wte.weight`, as save_pretrained does), plus the tokenizer
    files when tokenizer_dir holds OpenAI's encoder.json and vocab.bpe. The files appear
    together or not at all (see write_all): an export that fails leaves an earlier one in
    out_dir as it was. `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads it.
    Returns out_dir. Raises CheckpointError or HFError."""
    model = model_of(checkpoint_or_model)
    tensors = to_hf_state_dict(model.state_dict(), model.cfg.vocab_size)
    config = json.dumps(hf_config(model.cfg), indent=2)
    writers: dict[str, Writer] = {
        WEIGHTS: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        CONFIG: lambda tmp: tmp.write_text(config),
    }
    if tokenizer_dir is not None:
        writers |= tokenizer_writers(tokenizer_dir, model.cfg.block_size)
    out = Path(out_dir)
    write_all(out, writers)
    return out


def push_hf(
    out_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = True
) -> str:
    """Upload an export_hf folder (its config, weights, tokenizer files and README.md if any,
    not an `eval/` folder beside them) to model repo `repo_id` (created, private by default,
    when missing) in one commit; returns the commit URL. Raises HFError (not an exported folder)
    or HubError (no token, hub or network failure)."""
    folder = Path(out_dir)
    missing = [n for n in (CONFIG, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise HFError(f"{folder} has no {', '.join(missing)}: run `python -m pipeline.hf export`")
    api = HfApi(token=require_token(token))
    with hub_errors("pushing to", repo_id, "model"):
        prepare_repo(api, repo_id, "model", private, None)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            allow_patterns=[CONFIG, WEIGHTS, TOKENIZER_CONFIG, "README.md", *TOKENIZER_FILES],
            commit_message=f"GPT-2 weights from {folder.name}",
        )
    return str(getattr(info, "commit_url", info))
