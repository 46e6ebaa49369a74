"""llm.c's format: a checkpoint as the GPT-2 model file that Andrej Karpathy's llm.c reads
(`gpt2_build_from_checkpoint` of train_gpt2.c and train_gpt2.cu) and its train_gpt2.py writes
(`write_model`), float32 (version 3).

Layout of `model.bin` (all little-endian, no gaps, no alignment), as in github.com/karpathy/llm.c:
train_gpt2.py `write_model`, `write_tensors` and `pad_vocab` (commit fe04df9), train_gpt2.c
`GPT2Config`, `ParameterTensors`, `fill_in_parameter_sizes` and `gpt2_build_from_checkpoint`
(commit db2454f):

    header: 256 int32 (1,024 bytes), unused entries 0
      [0] 20240326        magic
      [1] 3               version: float32 parameters, padded vocabulary (5 would be bf16)
      [2] maxT            max_seq_len = block_size
      [3] V               vocab_size (50,257)
      [4] L               num_layers
      [5] NH              num_heads
      [6] C               channels = n_embd
      [7] Vp              padded_vocab_size: V rounded up to a multiple of 128 (50,304)
    parameters: float32, the 16 tensors in this order, each row-major; a per-layer tensor
    (L, ...) is layer 0's tensor, then layer 1's, ...:
      wte       (Vp, C)      token embedding; rows V..Vp-1 are zeros (pad_vocab, value=0)
      wpe       (maxT, C)    position embedding
      ln1w      (L, C)       h.N.ln_1.weight
      ln1b      (L, C)       h.N.ln_1.bias
      qkvw      (L, 3C, C)   h.N.attn.c_attn.weight: torch Linear (out, in), q, k, v rows
      qkvb      (L, 3C)      h.N.attn.c_attn.bias
      attprojw  (L, C, C)    h.N.attn.c_proj.weight
      attprojb  (L, C)       h.N.attn.c_proj.bias
      ln2w      (L, C)       h.N.ln_2.weight
      ln2b      (L, C)       h.N.ln_2.bias
      fcw       (L, 4C, C)   h.N.mlp.c_fc.weight
      fcb       (L, 4C)      h.N.mlp.c_fc.bias
      fcprojw   (L, C, 4C)   h.N.mlp.c_proj.weight
      fcprojb   (L, C)       h.N.mlp.c_proj.bias
      lnfw      (C,)         ln_f.weight
      lnfb      (C,)         ln_f.bias
    The output layer is wte itself (tied); there is nothing after lnfb. GPT-2 124M holds
    124,475,904 floats (llm.c prints `num_parameters: 124475904`).

Our names are llm.c's own PyTorch reference model's (nanoGPT's), so each tensor is copied as
it is; only the vocabulary rows differ: ours are padded to model.padded_vocab_size (a multiple of
64) and the padding rows are trained, llm.c pads to a multiple of 128 with zero rows (its
softmax and loss look at the first V columns only), so the first V rows are written and then
zeros. A model trained without biases (model.bias=false) gets zero biases, which compute the
same function. llm.c's CUDA trainer reads version 3 when built with `PRECISION=FP32`; the CPU
train_gpt2.c reads only version 3.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.interop.hf_export import model_of, write_all
from pipeline.model import GPT, ModelConfig

MAGIC = 20240326
VERSION_FP32 = 3
HEADER_INTS = 256
VOCAB_MULTIPLE = 128
"""llm.c's pad_vocab rounds the vocabulary up to a multiple of 128 (50,257 -> 50,304)."""
WEIGHTS = "model.bin"

LAYER_TENSORS = (
    ("ln1w", "ln_1.weight"),
    ("ln1b", "ln_1.bias"),
    ("qkvw", "attn.c_attn.weight"),
    ("qkvb", "attn.c_attn.bias"),
    ("attprojw", "attn.c_proj.weight"),
    ("attprojb", "attn.c_proj.bias"),
    ("ln2w", "ln_2.weight"),
    ("ln2b", "ln_2.bias"),
    ("fcw", "mlp.c_fc.weight"),
    ("fcb", "mlp.c_fc.bias"),
    ("fcprojw", "mlp.c_proj.weight"),
    ("fcprojb", "mlp.c_proj.bias"),
)
"""The per-layer tensors in file order: llm.c's name and ours under `transformer.h.N.`."""


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """llm.c's Vp: vocab_size rounded up to a multiple of `multiple` (50,257 -> 50,304)."""
    return -(-vocab_size // multiple) * multiple


def llmc_header(cfg: ModelConfig) -> np.ndarray:
    """The 256 little-endian int32 of the header (see the module docstring)."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (
        MAGIC,
        VERSION_FP32,
        cfg.block_size,
        cfg.vocab_size,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        padded_vocab_size(cfg.vocab_size),
    )
    return header


def llmc_tensors(
    sd: dict[str, torch.Tensor], cfg: ModelConfig
) -> list[tuple[str, list[torch.Tensor]]]:
    """The 16 parameter tensors of llm.c, in file order, from our state dict: (llm.c name,
    pieces), where the pieces written one after the other make the tensor (one per layer for
    the (L, ...) tensors). Every piece is float32 on the CPU (the meta device when sd's are:
    shapes only); wte has Vp rows, the last Vp - V zero. A missing bias (model.bias=false)
    is zeros. Raises KeyError for a missing weight."""
    wte = sd["transformer.wte.weight"]
    V, C = cfg.vocab_size, cfg.n_embd

    def get(name: str) -> torch.Tensor:
        if name not in sd and name.endswith(".bias"):  # model.bias=false: zero bias
            rows = sd[name.removesuffix(".bias") + ".weight"].shape[0]
            return torch.zeros(rows, device=wte.device)
        t = sd[name].detach()
        return (t if t.is_meta else t.cpu()).float()

    pad = torch.zeros(padded_vocab_size(V) - V, C, device=wte.device)
    out = [
        ("wte", [torch.cat([get("transformer.wte.weight")[:V], pad])]),  # (Vp, C)
        ("wpe", [get("transformer.wpe.weight")]),
    ]
    for name, ours in LAYER_TENSORS:
        out.append((name, [get(f"transformer.h.{n}.{ours}") for n in range(cfg.n_layer)]))
    out += [("lnfw", [get("transformer.ln_f.weight")]), ("lnfb", [get("transformer.ln_f.bias")])]
    return out


def write_llmc(path: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Write the header and the parameters (llmc_tensors) to the file at path, one layer's
    piece at a time (no copy of the whole model is made). Raises OSError."""
    with open(path, "wb") as f:
        f.write(llmc_header(cfg).tobytes())
        for _, pieces in llmc_tensors(sd, cfg):
            for piece in pieces:
                f.write(np.ascontiguousarray(piece.numpy(), dtype="<f4").tobytes())


def export_llmc(
    checkpoint_or_model: GPT | torch.nn.Module | str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Write a GPT (or a checkpoint / run folder's newest checkpoint) as out_dir/model.bin in
    llm.c's format, atomically through pipeline.files (see hf_export.write_all): a failed
    export leaves out_dir as it was. Returns out_dir. Raises CheckpointError (no checkpoint
    there), HFError (a module that is no GPT) or OutputError (out_dir is a file, a failed
    write)."""
    model = model_of(checkpoint_or_model)
    sd, cfg = model.state_dict(), model.cfg
    out = Path(out_dir)
    write_all(out, {WEIGHTS: lambda tmp: write_llmc(tmp, sd, cfg)})
    return out
