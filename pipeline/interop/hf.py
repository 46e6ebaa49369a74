"""OpenAI GPT-2 weights in, Hugging Face `GPT2LMHeadModel` folders out.

Our parameter names mirror Hugging Face's (`transformer.wte.weight`, `transformer.h.0.attn.
c_attn.weight`, ...), so a conversion is a key-by-key copy with two differences:

- HF keeps GPT-2's original `Conv1D` layers, whose weight is (in, out); our `nn.Linear` weights
  are (out, in), so the four projection matrices of each block are transposed both ways.
- We pad the vocabulary rows from 50,257 to padded_vocab_size (50,304 = 786·64, for tensor-core
  tiles); HF does not. Imported weights get zero rows, exported ones lose the padding rows.

The published files differ in details that are handled here: `openai-community/gpt2*`'s
model.safetensors has no `transformer.` prefix and carries the causal-mask buffers
`h.N.attn.bias` (skipped); files saved by `save_pretrained` have the prefix and no
`lm_head.weight` (tied to `transformer.wte.weight`).

Command line:
  python -m pipeline.hf export runs/NAME[/checkpoints/step_NNNNNNN] OUT_DIR [--tokenizer-dir D]
  python -m pipeline.hf push OUT_DIR USER/REPO [--public]
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.data.tokenizer import EOT, VOCAB_SIZE
from pipeline.errors import HFError
from pipeline.interop.hub import _hub_errors, _prepare_repo, _token
from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint import load_model as load_checkpoint_model
from pipeline.training.runtime import unwrap_model

OPENAI_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
"""The four GPT-2 releases on the hub (the short ids `gpt2`, ... redirect to these)."""
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
"""Weights stored (in, out) by HF's Conv1D: transposed to and from our (out, in) Linear."""
BUFFERS = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers of older GPT-2 files: constants, not weights."""
WEIGHTS, CONFIG = "model.safetensors", "config.json"
TIED = ("transformer.wte.weight", "lm_head.weight")


# --------------------------------------------------------------------------- state dicts


def _tied(head: torch.Tensor, wte: torch.Tensor) -> bool:
    """Whether the output layer holds the token embedding (shared, or equal values; tensors on
    the meta device, which have no values, count as tied)."""
    if head.shape != wte.shape:
        return False
    return head.is_meta or head.data_ptr() == wte.data_ptr() or torch.equal(head, wte)


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], padded_vocab_size: int | None = 50304
) -> dict[str, torch.Tensor]:
    """Our GPT state dict from a GPT2LMHeadModel (or GPT2Model) state dict.

    Conv1D weights (in, out) become Linear weights (out, in); keys get the `transformer.`
    prefix where missing; mask buffers are dropped; the token embedding (V, C) gets zero rows up
    to padded_vocab_size (None = no padding) and is also returned as `lm_head.weight` (tied).
    The zero rows are harmless for training and generation: their ids never occur as inputs or
    targets, generation masks their logits, and training pushes their logits down. They do give
    the padding columns logit 0, which a softmax over all columns counts (GPT-2's logits are
    mostly well below 0), so a loss of imported weights must be taken over the first vocab_size
    columns (pipeline.hellaswag does) or the weights loaded with padded_vocab_size=None (as
    pipeline.evaluate and pipeline.sample do).
    Raises HFError for a missing token embedding or an output layer not tied to it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith(BUFFERS):
            continue
        out[name] = value.t().contiguous() if name.endswith(CONV1D) else value
    if TIED[0] not in out:
        raise HFError(f"no {TIED[0]} (token embedding) among {len(sd)} tensors: not GPT-2 weights")
    wte = out[TIED[0]]
    head = out.pop(TIED[1], None)
    if head is not None and not _tied(head, wte):
        raise HFError("lm_head.weight differs from the token embedding: untied heads unsupported")
    if padded_vocab_size is not None and padded_vocab_size > wte.size(0):
        wte = torch.cat([wte, wte.new_zeros(padded_vocab_size - wte.size(0), wte.size(1))])
    out[TIED[0]] = out[TIED[1]] = wte
    return out


def to_hf_state_dict(
    sd: dict[str, torch.Tensor], vocab_size: int = VOCAB_SIZE
) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (as `save_pretrained` writes it) from ours: padding rows of
    the embedding dropped (first vocab_size kept), Linear weights transposed to Conv1D (in, out),
    `lm_head.weight` left out (tied to `transformer.wte.weight`). Every tensor is a contiguous
    copy on the CPU owning its storage, as safetensors requires."""
    out = {}
    for name, value in sd.items():
        if name == TIED[1]:
            continue
        value = value.detach() if value.is_meta else value.detach().cpu()  # meta: shapes only
        if name == TIED[0]:
            value = value[:vocab_size]
        out[name] = (value.t() if name.endswith(CONV1D) else value).contiguous().clone()
    return out


# --------------------------------------------------------------------------- configs


def model_config_from_hf(config: dict, padded_vocab_size: int | None = 50304) -> ModelConfig:
    """ModelConfig from a GPT-2 config.json (n_layer, n_head, n_embd, n_positions, vocab_size).
    Raises HFError, listing every setting this architecture cannot reproduce."""
    problems = []
    if config.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={config.get('model_type')!r}, not gpt2")
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={config['activation_function']!r}, not gelu_new")
    if config.get("layer_norm_epsilon", 1e-5) != 1e-5:
        problems.append(f"layer_norm_epsilon={config['layer_norm_epsilon']}, not 1e-5")
    if config.get("n_inner") not in (None, 4 * config.get("n_embd", 768)):
        problems.append(f"n_inner={config['n_inner']}, not 4·n_embd")
    if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if problems:
        raise HFError("unsupported GPT-2 config: " + "; ".join(problems))
    vocab = config.get("vocab_size", VOCAB_SIZE)
    return ModelConfig(
        n_layer=config.get("n_layer", 12),
        n_head=config.get("n_head", 12),
        n_embd=config.get("n_embd", 768),
        block_size=config.get("n_positions", 1024),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size
        if padded_vocab_size and padded_vocab_size > vocab
        else None,
        dropout=0.0,
    )


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of a GPT2LMHeadModel with our architecture (un-padded vocabulary)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_inner": None,
        "vocab_size": cfg.vocab_size,
        "activation_function": "gelu_new",  # GELU, tanh approximation (nn.GELU("tanh"))
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- loading


def _build(config: dict, weights: dict[str, torch.Tensor], padded_vocab_size: int | None) -> GPT:
    model = GPT(model_config_from_hf(config, padded_vocab_size))
    sd = from_hf_state_dict(weights, model.cfg.padded_vocab_size)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise HFError(f"the weights do not match config.json: {e}") from None
    return model.eval()


def _read(config_path: Path, weights_path: Path, padded_vocab_size: int | None) -> GPT:
    try:
        config = json.loads(Path(config_path).read_text())
        weights = load_file(weights_path)
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise HFError(f"cannot read {config_path} / {weights_path}: {e}") from None
    return _build(config, weights, padded_vocab_size)


def load_hf_dir(path: str | os.PathLike, padded_vocab_size: int | None = 50304) -> GPT:
    """Our GPT (eval mode, float32, CPU) from a folder with config.json and model.safetensors in
    GPT2LMHeadModel format (what export_hf and `save_pretrained` write). Raises HFError."""
    path = Path(path)
    missing = [n for n in (CONFIG, WEIGHTS) if not (path / n).is_file()]
    if missing:
        raise HFError(f"{path} has no {' or '.join(missing)}: not a Hugging Face GPT-2 folder")
    return _read(path / CONFIG, path / WEIGHTS, padded_vocab_size)


def openai_repo(name: str) -> str:
    """Hub repo of an OpenAI GPT-2 release: gpt2, gpt2-medium, gpt2-large, gpt2-xl (also
    written gpt2_medium, ... as the model presets, or openai-community/...). Raises HFError."""
    short = name.removeprefix("openai-community/").replace("_", "-")
    if short not in OPENAI_MODELS:
        raise HFError(f"unknown GPT-2 model {name!r}: choose one of {', '.join(OPENAI_MODELS)}")
    return OPENAI_MODELS[short]


def load_openai_gpt2(
    name: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    padded_vocab_size: int | None = 50304,
) -> GPT:
    """OpenAI's GPT-2 `name` (gpt2, gpt2-medium, gpt2-large, gpt2-xl) as our GPT, eval mode.

    Downloads config.json and model.safetensors with hf_hub_download (or takes them from the
    Hugging Face cache, also offline with HF_HUB_OFFLINE=1). Raises HFError (unknown name,
    unreadable files) or HubError (download failed, not cached).
    """
    repo = openai_repo(name)
    with _hub_errors("downloading", repo, "model"):
        paths = [
            Path(hf_hub_download(repo, f, revision=revision, cache_dir=cache_dir))
            for f in (CONFIG, WEIGHTS)
        ]
    return _read(*paths, padded_vocab_size)


def load_model(source: GPT | torch.nn.Module | str | os.PathLike) -> tuple[GPT, Path | None]:
    """A GPT and the checkpoint it came from (None for a model passed in): a model (also
    compiled or DDP-wrapped), a checkpoint folder or a run folder (its newest checkpoint).
    Raises CheckpointError."""
    if isinstance(source, torch.nn.Module):
        try:
            return unwrap_model(source), None
        except TypeError as e:
            raise HFError(str(e)) from None
    model, ckpt, _ = load_checkpoint_model(source)
    return model, ckpt


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


TOKENIZER_FILES = {"vocab.json": ("encoder.json", "vocab.json"), "merges.txt": ("vocab.bpe",)}
"""HF file name -> the names it has in OpenAI's release (encoder.json, vocab.bpe) or HF's."""


def write_tokenizer(tokenizer_dir: str | os.PathLike, out_dir: Path, max_length: int) -> None:
    """GPT-2 tokenizer files of HF's GPT2Tokenizer (vocab.json, merges.txt, tokenizer_config
    .json) from OpenAI's encoder.json and vocab.bpe (or HF's names) in tokenizer_dir.
    Raises HFError when they are missing."""
    src = Path(tokenizer_dir)
    for target, names in TOKENIZER_FILES.items():
        found = next((src / n for n in names if (src / n).is_file()), None)
        if found is None:
            raise HFError(f"{src} has none of {', '.join(names)}: pass the GPT-2 tokenizer files")
        _write_atomic(out_dir / target, lambda tmp, f=found: shutil.copyfile(f, tmp))
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
    _write_atomic(out_dir / "tokenizer_config.json", lambda t: t.write_text(json.dumps(config)))


def export_hf(
    checkpoint_or_model: GPT | torch.nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a GPT (or a checkpoint / run folder's newest checkpoint) as a GPT2LMHeadModel
    folder: config.json and model.safetensors (float32, vocabulary cut to vocab_size, tied
    lm_head stored once as `transformer.wte.weight`, as save_pretrained does), plus the tokenizer
    files when tokenizer_dir holds OpenAI's encoder.json and vocab.bpe. Each file is written
    under a temporary name and renamed. `transformers.GPT2LMHeadModel.from_pretrained(out_dir)`
    loads it. Returns out_dir. Raises CheckpointError or HFError."""
    model, _ = load_model(checkpoint_or_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model.state_dict(), model.cfg.vocab_size)
    _write_atomic(out / WEIGHTS, lambda t: save_file(tensors, t, metadata={"format": "pt"}))
    config = json.dumps(hf_config(model.cfg), indent=2)
    _write_atomic(out / CONFIG, lambda t: t.write_text(config))
    if tokenizer_dir is not None:
        write_tokenizer(tokenizer_dir, out, model.cfg.block_size)
    return out


def push_hf(
    out_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = True
) -> str:
    """Upload an export_hf folder (its config, weights, tokenizer files and README.md if any,
    not an `eval/` folder beside them) to model repo `repo_id` (created, private by default,
    when missing) in one commit; returns the commit URL. Raises HFError (not an exported folder) or
    HubError (no token, hub or network failure)."""
    folder = Path(out_dir)
    missing = [n for n in (CONFIG, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise HFError(f"{folder} has no {', '.join(missing)}: run `python -m pipeline.hf export`")
    api = HfApi(token=_token(token))
    with _hub_errors("pushing to", repo_id, "model"):
        _prepare_repo(api, repo_id, "model", private, None)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            allow_patterns=[
                CONFIG,
                WEIGHTS,
                "tokenizer_config.json",
                "README.md",
                *TOKENIZER_FILES,
            ],
            commit_message=f"GPT-2 weights from {folder.name}",
        )
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------- command line
