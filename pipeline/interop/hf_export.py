"""A checkpoint (or a GPT) written as a Hugging Face `GPT2LMHeadModel` folder with the GPT-2
tokenizer, kept as a reusable export beside a run, and pushed to a model repo. The conversion
itself is pipeline.interop.hf_weights.

Command line (pipeline/export.py):
  python -m pipeline.export checkpoint runs/NAME[/checkpoints/step_NNNNNNN] OUT_DIR
      [--tokenizer-dir D]
  python -m pipeline.export push OUT_DIR USER/REPO [--public]
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

from pipeline.data.tokenizer import gpt2_files
from pipeline.errors import HFError, OutputError
from pipeline.files import atomic_dir, atomic_path, make_folder, write_failed, write_json_atomic
from pipeline.interop.hf_weights import CONFIG, WEIGHTS, hf_config, to_hf_state_dict
from pipeline.interop.hub_errors import hub_errors, require_token
from pipeline.interop.hub_transfer import prepare_repo
from pipeline.model import GPT, unwrap_model
from pipeline.training.checkpoint.folder import (
    load_model,
    read_state,
    resolve_checkpoint,
    weights_sha256,
)

TOKENIZER_FILES = {
    "vocab.json": ("encoder.json", "vocab.json"),
    "merges.txt": ("vocab.bpe", "merges.txt"),
}
"""HF file name -> the names it has in OpenAI's release (encoder.json, vocab.bpe), then HF's."""
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = "special_tokens_map.json"
EXPORT_CACHE = "hf_export"
"""The folder beside a run's checkpoints that holds the export of one of them (export_cached)."""
SOURCE = "source.json"
"""What an export_cached folder was written from: checkpoint folder, step, weights_sha256."""

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


def tokenizer_writers(
    tokenizer_dir: str | os.PathLike | None, max_length: int
) -> dict[str, Writer]:
    """Writers of the files of HF's GPT2Tokenizer (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json), by file name, so that
    `AutoTokenizer.from_pretrained` loads the folder with no other argument. vocab.json and
    merges.txt are tiktoken's own `gpt2` files (pipeline.data.tokenizer.gpt2_files), or, when
    tokenizer_dir is given, OpenAI's encoder.json and vocab.bpe (or HF's names) found there.
    Raises HFError when that folder lacks them, DataError when tiktoken's files are missing."""
    writers: dict[str, Writer] = {}
    if tokenizer_dir is None:
        files = gpt2_files()
        for target, (openai_name, _) in TOKENIZER_FILES.items():
            writers[target] = lambda tmp, data=files[openai_name]: tmp.write_bytes(data)
    else:
        src = Path(tokenizer_dir)
        for target, names in TOKENIZER_FILES.items():
            found = next((src / n for n in names if (src / n).is_file()), None)
            if found is None:
                raise HFError(
                    f"{src} has none of {', '.join(names)}: pass the GPT-2 tokenizer files"
                )
            writers[target] = lambda tmp, f=found: shutil.copyfile(f, tmp)
    special = "<|endoftext|>"  # GPT-2's one special token: end of text, also bos and unk
    tokens = {"bos_token": special, "eos_token": special, "unk_token": special}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        **tokens,
        "add_prefix_space": False,
        "add_bos_token": False,
    }
    writers[TOKENIZER_CONFIG] = lambda tmp: tmp.write_text(json.dumps(config, indent=2))
    writers[SPECIAL_TOKENS] = lambda tmp: tmp.write_text(json.dumps(tokens, indent=2))
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
        raise write_failed(
            out,
            e,
            f"no partial file is left and {out} holds what it held "
            "before: free disk space and run the export again",
        ) from e


def export_hf(
    checkpoint_or_model: GPT | torch.nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a GPT (or a checkpoint / run folder's newest checkpoint) as a GPT2LMHeadModel
    folder: config.json and model.safetensors (float32, vocabulary cut to vocab_size, tied
    lm_head stored once as `transformer.wte.weight`, as save_pretrained does) and the GPT-2
    tokenizer files (tokenizer_writers: tiktoken's `gpt2` files, or OpenAI's from
    tokenizer_dir). The files appear together or not at all (see write_all): an export that
    fails leaves an earlier one in out_dir as it was. `GPT2LMHeadModel.from_pretrained(out_dir)`
    and `AutoTokenizer.from_pretrained(out_dir)` load it. Returns out_dir. Raises
    CheckpointError, HFError or DataError."""
    model = model_of(checkpoint_or_model)
    writers = tokenizer_writers(tokenizer_dir, model.cfg.block_size)  # missing files: no write
    tensors = to_hf_state_dict(model.state_dict(), model.cfg.vocab_size)
    config = json.dumps(hf_config(model.cfg), indent=2)
    writers = {
        WEIGHTS: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        CONFIG: lambda tmp: tmp.write_text(config),
        **writers,
    }
    out = Path(out_dir)
    write_all(out, writers)
    return out


def _export_source(checkpoint: Path, state: dict) -> dict:
    return {
        "checkpoint": str(checkpoint.resolve()),
        "step": state.get("step"),
        "model_sha256": weights_sha256(state),
    }


def _reusable(out: Path, source: dict) -> bool:
    """Whether out holds a complete export of the checkpoint `source` describes."""
    try:
        recorded = json.loads((out / SOURCE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    names = (CONFIG, WEIGHTS, TOKENIZER_CONFIG, SPECIAL_TOKENS, *TOKENIZER_FILES)
    return (
        source["model_sha256"] is not None
        and recorded == source
        and all((out / n).is_file() for n in names)
    )


def export_cached(checkpoint: str | os.PathLike) -> tuple[Path, Path, dict]:
    """The export (export_hf, with the tokenizer) of a checkpoint folder, or of a run folder's
    newest checkpoint, in `<run>/hf_export/`: reused when its source.json names the same
    checkpoint (folder, step and the fingerprint of its tensors, weights_sha256), else written
    again in place of the export of another checkpoint. The folder is written under a
    temporary name and renamed when complete (pipeline.files.atomic_dir), so it is whole or
    absent. Returns (export folder, checkpoint folder, its state.json). Raises CheckpointError,
    HFError, DataError or OutputError."""
    ckpt = resolve_checkpoint(checkpoint)
    state = read_state(ckpt)
    out = ckpt.parent.parent / EXPORT_CACHE
    source = _export_source(ckpt, state)
    if _reusable(out, source):
        print(f"reusing {out}: the export of {ckpt}")
        return out, ckpt, state
    model, _, _ = load_model(ckpt)
    make_folder(out.parent, "run folder", "checkpoint")
    try:
        with atomic_dir(out, tmp=out.with_name(f".{out.name}.tmp")) as tmp:
            export_hf(model, tmp)
            write_json_atomic(tmp / SOURCE, source)
    except OutputError:  # write_all's, already saying what failed
        raise
    except OSError as e:  # the rename into place; the partial folder is gone
        raise write_failed(
            out, e, "no partial export is left: free disk space and run the same command again"
        ) from e
    print(f"exported {ckpt} to {out}")
    return out, ckpt, state


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
        raise HFError(
            f"{folder} has no {', '.join(missing)}: run `python -m pipeline.export checkpoint`"
        )
    api = HfApi(token=require_token(token))
    with hub_errors("pushing to", repo_id, "model"):
        prepare_repo(api, repo_id, "model", private, None)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            allow_patterns=[
                CONFIG,
                WEIGHTS,
                TOKENIZER_CONFIG,
                SPECIAL_TOKENS,
                "README.md",
                *TOKENIZER_FILES,
            ],
            commit_message=f"GPT-2 weights from {folder.name}",
        )
    return str(getattr(info, "commit_url", info))
