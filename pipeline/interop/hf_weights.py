"""The Hugging Face GPT-2 format: OpenAI's GPT-2 weights and `GPT2LMHeadModel` folders in,
state dicts and configs both ways.

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

Writing such folders and pushing them: pipeline.interop.hf_export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.data.tokenizer import EOT, VOCAB_SIZE
from pipeline.errors import HFError
from pipeline.interop.hub_errors import hub_errors
from pipeline.model import GPT, ModelConfig

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
    columns (pipeline.scoring.hellaswag does) or the weights loaded with
    padded_vocab_size=None (as pipeline.evaluation.loading does for evaluate and sample).
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
    with hub_errors("downloading", repo, "model"):
        paths = [
            Path(hf_hub_download(repo, f, revision=revision, cache_dir=cache_dir))
            for f in (CONFIG, WEIGHTS)
        ]
    return _read(*paths, padded_vocab_size)
