"""The model to evaluate or sample from: a checkpoint (through pipeline.training.checkpoint.folder's
one checkpoint -> GPT loader), OpenAI's GPT-2 weights, or a local Hugging Face GPT-2 folder;
and where its evaluation results go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.interop.hf_weights import load_hf_dir, load_openai_gpt2, openai_repo
from pipeline.model import GPT
from pipeline.training.checkpoint.folder import load_model

OPENAI_EVAL_DIR = Path("runs") / "openai" / "eval"
"""Results of OpenAI's weights (relative to the working directory)."""


@dataclass
class Loaded:
    """A model to evaluate and where it came from."""

    model: GPT
    name: str
    """Stem of the result files: the checkpoint folder's name (step_NNNNNNN) or the model's."""
    source: str
    """The checkpoint folder, the hub repo or the local Hugging Face folder."""
    eval_dir: Path
    """Folder of the results: `<run>/eval`, `runs/openai/eval` or `<hf folder>/eval`."""
    step: int | None = None
    tokens_seen: int | None = None
    train_config: dict | None = None
    """The training config recorded in the checkpoint (None for imported weights)."""
    data: dict | None = None
    """The data the checkpoint was trained on: {"shard_dir": absolute folder,
    "manifest_fingerprint": ...}; None for imported weights and older checkpoints."""


def load_for_eval(checkpoint: str | None = None, pretrained: str | None = None) -> Loaded:
    """The model of a checkpoint (or a run's newest), or imported GPT-2 weights: `pretrained` is an
    OpenAI name (gpt2 ... gpt2-xl, from the hub or its cache) or a local GPT2LMHeadModel folder.
    Imported weights keep the exact vocabulary (no padding rows, which would take softmax mass).
    Raises CheckpointError, HFError or HubError; ValueError when given neither."""
    if checkpoint is not None:
        gpt, ckpt, state = load_model(checkpoint)
        eval_dir = ckpt.parent.parent / "eval"
        step, tokens = state["step"], state["tokens_seen"]
        return Loaded(
            gpt, ckpt.name, str(ckpt), eval_dir, step, tokens, state["config"], state.get("data")
        )
    if pretrained is None:
        raise ValueError("pass a checkpoint or pretrained weights")
    folder = Path(pretrained)
    if folder.is_dir():
        gpt = load_hf_dir(folder, padded_vocab_size=None)
        return Loaded(gpt, folder.resolve().name, str(folder), folder / "eval")
    repo = openai_repo(pretrained)
    gpt = load_openai_gpt2(pretrained, padded_vocab_size=None)
    return Loaded(gpt, repo.split("/")[-1], repo, OPENAI_EVAL_DIR)
