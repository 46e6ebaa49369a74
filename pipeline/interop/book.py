"""The book's format: a checkpoint as a `state_dict` of `GPTModel` from Sebastian Raschka's "Build
a Large Language Model (From Scratch)" (Manning 2024; the `llms-from-scratch` package on PyPI,
`llms_from_scratch.ch04.GPTModel`, code at github.com/rasbt/LLMs-from-scratch), plus the
book's config dict.

The folder holds two files:

- `config.json`: the dict `GPTModel(cfg)` takes: vocab_size, context_length, emb_dim, n_heads,
  n_layers, drop_rate, qkv_bias (always true: GPT-2 has query, key and value biases).
- `model.pth`: `torch.save` of the state dict, float32 on the CPU, so that
  `GPTModel(cfg).load_state_dict(torch.load("model.pth", weights_only=True))` loads it
  (strict: every key the book's model has, its causal-mask buffers included).

The architectures are the same (pre-LayerNorm blocks, GELU with the tanh approximation, biased
LayerNorms with eps 1e-5 and biased variance, attention scaled by 1/sqrt(head_dim)); only names
and three layouts differ. V = vocab_size (50,257), Vp = our padded rows (e.g. 50,304),
C = n_embd, T = block_size; every Linear weight is (out, in) in both models:

    ours (pipeline.model.GPT)              the book's GPTModel              shape
    transformer.wte.weight (Vp, C)         tok_emb.weight                   (V, C)  padding dropped
    lm_head.weight (tied to wte)           out_head.weight (untied)         (V, C)  a copy of wte
    transformer.wpe.weight                 pos_emb.weight                   (T, C)
    h.N.ln_1.weight / .bias                trf_blocks.N.norm1.scale / .shift (C,)
    h.N.attn.c_attn.weight (3C, C)         att.W_query / W_key / W_value    (C, C)  rows split
    h.N.attn.c_attn.bias (3C,)             att.W_query / W_key / W_value    (C,)    in q, k, v order
    h.N.attn.c_proj.weight / .bias         att.out_proj.weight / .bias      (C, C), (C,)
    (none: SDPA's is_causal)               att.mask                         (T, T)  triu(ones, 1)
    h.N.ln_2.weight / .bias                norm2.scale / .shift             (C,)
    h.N.mlp.c_fc.weight / .bias            ff.layers.0.weight / .bias       (4C, C), (4C,)
    h.N.mlp.c_proj.weight / .bias          ff.layers.2.weight / .bias       (C, 4C), (C,)
    transformer.ln_f.weight / .bias        final_norm.scale / .shift        (C,)

The q, k, v split follows the book's own loader of OpenAI's weights (`load_weights_into_gpt` in
`llms_from_scratch/ch05.py`, 1.0.19): it splits GPT-2's fused `c_attn` into three equal parts
along the output axis, in q, k, v order, and transposes them because TensorFlow's Conv1D stores
(in, out); our `c_attn` is already a torch Linear (out, in), so its rows are split without a
transpose. A model trained without biases (model.bias=false) gets zero biases and shifts, which
compute the same function in the book's always-biased layers.

The book's package (1.0.19) declares tensorflow and numpy<2.1 as dependencies, but `ch04`
imports only torch; `make setup` installs it with `pip install --no-deps`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.interop.hf_export import Writer, model_of, write_all
from pipeline.model import GPT, ModelConfig

WEIGHTS, CONFIG = "model.pth", "config.json"


def book_config(cfg: ModelConfig) -> dict:
    """The book's GPTModel config dict of our architecture (un-padded vocabulary)."""
    return {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.block_size,
        "emb_dim": cfg.n_embd,
        "n_heads": cfg.n_head,
        "n_layers": cfg.n_layer,
        "drop_rate": cfg.dropout,
        "qkv_bias": True,
    }


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A float32 contiguous copy owning its storage (on the CPU unless t is on the meta device,
    which has shapes but no values)."""
    t = t.detach()
    return (t if t.is_meta else t.cpu()).float().contiguous().clone()


def to_book_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The book's GPTModel state dict from ours (see the module docstring for the mapping).

    sd: our GPT's state dict (keys `transformer.*`, `lm_head.weight`), any device, float
    dtype. Returns float32 tensors on the CPU (on the meta device when sd's are: shapes only),
    each a copy owning its storage; out_head.weight is a copy of tok_emb.weight, not shared.
    Missing biases (model.bias=false) become zeros. Raises KeyError for a missing weight."""
    C, T, V = cfg.n_embd, cfg.block_size, cfg.vocab_size
    wte = sd["transformer.wte.weight"]

    def get(name: str, rows: int | None = None) -> torch.Tensor:
        if name in sd:
            return _plain(sd[name])
        if name.endswith(".bias") and rows is not None:  # model.bias=false: zero shift
            return torch.zeros(rows, device=wte.device)
        raise KeyError(f"{name} is not in the state dict: not a checkpoint of this GPT")

    out = {"tok_emb.weight": _plain(wte[:V]), "pos_emb.weight": get("transformer.wpe.weight")}
    for n in range(cfg.n_layer):
        ours, book = f"transformer.h.{n}.", f"trf_blocks.{n}."
        qkv_w = get(ours + "attn.c_attn.weight")  # (3C, C): q, k, v rows
        qkv_b = get(ours + "attn.c_attn.bias", 3 * C)  # (3C,)
        out[book + "att.mask"] = torch.ones(T, T, device=wte.device).triu(diagonal=1)
        for i, part in enumerate(("W_query", "W_key", "W_value")):
            out[f"{book}att.{part}.weight"] = qkv_w[i * C : (i + 1) * C].clone()  # (C, C)
            out[f"{book}att.{part}.bias"] = qkv_b[i * C : (i + 1) * C].clone()  # (C,)
        out[book + "att.out_proj.weight"] = get(ours + "attn.c_proj.weight")  # (C, C)
        out[book + "att.out_proj.bias"] = get(ours + "attn.c_proj.bias", C)
        out[book + "ff.layers.0.weight"] = get(ours + "mlp.c_fc.weight")  # (4C, C)
        out[book + "ff.layers.0.bias"] = get(ours + "mlp.c_fc.bias", 4 * C)
        out[book + "ff.layers.2.weight"] = get(ours + "mlp.c_proj.weight")  # (C, 4C)
        out[book + "ff.layers.2.bias"] = get(ours + "mlp.c_proj.bias", C)
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{book}{norm}.scale"] = get(f"{ours}{ln}.weight")  # (C,)
            out[f"{book}{norm}.shift"] = get(f"{ours}{ln}.bias", C)
    out["final_norm.scale"] = get("transformer.ln_f.weight")
    out["final_norm.shift"] = get("transformer.ln_f.bias", C)
    out["out_head.weight"] = _plain(wte[:V])  # the book's head is untied: its own copy
    return out


def export_book(
    checkpoint_or_model: GPT | torch.nn.Module | str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Write a GPT (or a checkpoint / run folder's newest checkpoint) in the book's format:
    out_dir/config.json (book_config) and out_dir/model.pth (to_book_state_dict, torch.save).
    Both appear together or not at all, through pipeline.files (see hf_export.write_all): a
    failed export leaves out_dir as it was. Returns out_dir. Raises CheckpointError (no
    checkpoint there), HFError (a module that is no GPT) or OutputError (out_dir is a file,
    a failed write)."""
    model = model_of(checkpoint_or_model)
    tensors = to_book_state_dict(model.state_dict(), model.cfg)
    config = json.dumps(book_config(model.cfg), indent=2) + "\n"
    writers: dict[str, Writer] = {
        WEIGHTS: lambda tmp: torch.save(tensors, tmp),
        CONFIG: lambda tmp: tmp.write_text(config),
    }
    out = Path(out_dir)
    write_all(out, writers)
    return out
