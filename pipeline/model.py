"""GPT-2 in one file: config, modules, initialisation, generation (with a KV cache).

Follows the OpenAI GPT-2 release (Radford et al. 2019) as reproduced by nanoGPT and llm.c:
pre-LayerNorm blocks, GELU (tanh approximation) MLP of width 4·n_embd, learned position
embeddings, biases everywhere, tied input/output embeddings, and the residual projections
initialised with std 0.02/sqrt(2·n_layer).

Shapes use B = batch, T = sequence length (≤ block_size), C = n_embd, V = padded vocabulary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelConfig:
    """GPT-2 architecture. The presets below mirror `conf/model/*.yaml`."""

    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream (C)."""
    block_size: int = 1024
    """Longest sequence (context length) in tokens; size of the position embedding."""
    vocab_size: int = 50257
    """Tokenizer vocabulary (tiktoken gpt2: 50,257 ids, EOT = 50256)."""
    padded_vocab_size: int | None = 50304
    """Embedding rows, rounded up from vocab_size to a multiple of 64 (50304 = 786·64) so the
    output matmul maps onto tensor-core tiles (nanoGPT, llm.c); None = no padding. The extra rows
    are never targets, and their logits are masked out in generation."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (0 for pretraining, as llm.c)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2."""

    @property
    def embedding_rows(self) -> int:
        """Rows of the token embedding / output layer (V)."""
        return self.padded_vocab_size or self.vocab_size

    def problems(self) -> list[str]:
        """Every inconsistency in this config, each with the fix, or [] when it is valid."""
        out = []
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size) < 1:
            out.append("model: n_layer, n_head, n_embd, block_size and vocab_size must be >= 1")
        elif self.n_embd % self.n_head:
            out.append(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "choose n_head among the divisors of n_embd"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            out.append(
                f"model.padded_vocab_size={self.padded_vocab_size} is below "
                f"model.vocab_size={self.vocab_size}: set it >= vocab_size or null"
            )
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout={self.dropout} must be in [0, 1)")
        return out


# Published GPT-2 sizes (OpenAI GPT-2 release, hparams.json of each checkpoint).
PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2_medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2_large": ModelConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2_xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Trains on a laptop CPU in minutes; same code path as the real presets.
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
}


LossImpl = Literal["chunked", "full", "liger"]
LOSS_IMPLS: tuple[str, ...] = ("chunked", "full", "liger")
"""How GPT.forward computes the output layer and the cross-entropy (runtime.loss_impl):
chunked (default; no (B, T, V) logits held), full (the logits materialised, as nanoGPT does;
the reference the chunked loss is tested against), liger (Liger-Kernel's fused Triton kernel,
CUDA only, opt-in)."""

LOSS_CHUNK_BYTES: dict[str, int] = {"cuda": 1 << 30, "cpu": 1 << 26}
"""Float32 logits the chunked loss computes at once, by device type. On a GPU 1 GiB: each chunk
re-reads the output weight and adds into the float32 grad_weight, so few large chunks keep that
memory traffic small (16 chunks for GPT-2 124M at 64 × 1024 instead of 256). On a CPU 64 MiB
(256 rows of the 50304-entry vocabulary): measured on a 2-core CPU (BENCHMARKS.md), 64 to 1024
rows train the tiny model at the same step time within noise; smaller chunks only add Python
overhead, larger ones only memory. Other devices take the CPU's."""
MAX_LOSS_CHUNKS = 16
"""At most this many chunks per micro-batch, whatever its size (chunks grow past the budget
instead): torch.compile unrolls the chunk loop, and its compile time grows with the number of
chunks (27 s at 16 chunks, 233 s at 256 for the loss alone on a CPU; BENCHMARKS.md)."""


def loss_chunk_rows(vocab_rows: int, rows: int = 0, device_type: str = "cpu") -> int:
    """Rows (positions) per chunk of the chunked loss for `rows` positions in all: the largest
    power of two whose float32 logits, rows × vocab_rows × 4 bytes, fit LOSS_CHUNK_BYTES of the
    device type, but at least ceil(rows / MAX_LOSS_CHUNKS), so there are never more than
    MAX_LOSS_CHUNKS chunks (at least 1 row)."""
    budget = LOSS_CHUNK_BYTES.get(device_type, LOSS_CHUNK_BYTES["cpu"]) // (4 * vocab_rows)
    within = 1 << (max(1, budget).bit_length() - 1)
    return max(within, -(-rows // MAX_LOSS_CHUNKS))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) against targets, chunk by chunk of positions.

    The forward computes each chunk's logits, its loss and, at once, its gradients: with
    p = softmax(logits), d loss / d logits = (p - onehot(target)) / N, so the chunk adds
    dlogits @ weight to grad_x and dlogits.T @ x to grad_weight, and its logits are freed.
    Only grad_x (N, C) and grad_weight (V, C, float32) are kept for the backward, which scales
    them by the incoming gradient: the same FLOPs as logits + cross-entropy + their backward,
    without the (N, V) logits, their float32 copy and their gradient (the technique of
    Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, in plain PyTorch). grad_weight
    accumulates over chunks in float32 even under bf16 autocast, since a bf16 accumulator
    across chunks loses precision (Liger-Kernel issue #512). Matmuls follow the ambient
    autocast (bf16 on GPUs); the softmax is float32, as `F.cross_entropy(logits.float())`.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int):
        # x: (N, C); weight: (V, C); targets: (N,) int64
        n = x.size(0)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # (V, C)
        for start in range(0, n, chunk_rows):
            xc, tc = x[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = (xc @ weight.t()).float()  # (n_c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n_c,)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n_c, V)
            dlogits.scatter_add_(1, tc[:, None], dlogits.new_full((tc.numel(), 1), -1.0))
            dlogits = dlogits.div_(n).to(weight.dtype)  # bf16 weights (FSDP2): bf16 matmuls
            grad_x[start : start + chunk_rows] = dlogits @ weight  # (n_c, C)
            grad_weight += dlogits.t() @ xc  # (V, C)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_output, grad_weight * grad_output, None, None


def chunked_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy (nats) of the logits x @ weight.T against targets, computed chunk_rows
    positions at a time so no (N, V) float32 logits exist at once.

    x: (N, C) float; weight: (V, C); targets: (N,) int64 in [0, V). reduction "mean" gives a
    float32 scalar, differentiable in x and weight (see _LinearCrossEntropy); "none" gives the
    (N,) float32 per-position losses and is for evaluation only (no gradient). chunk_rows
    defaults to loss_chunk_rows(V, N, x.device.type). Equals
    `F.cross_entropy((x @ weight.T).float(), targets)` up to float rounding. Raises ValueError
    for another reduction or a gradient with "none".
    """
    chunk_rows = chunk_rows or loss_chunk_rows(weight.size(0), x.size(0), x.device.type)
    if reduction == "mean":
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
        reduction, mean = "none", True
    elif reduction == "none":
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            raise ValueError("chunked_cross_entropy: reduction='none' has no gradient")
        mean = False
    else:
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")
    losses = torch.cat(
        [
            F.cross_entropy((xc @ weight.t()).float(), tc, reduction="none")
            for xc, tc in zip(x.split(chunk_rows), targets.split(chunk_rows))
        ]
    )  # (N,)
    return losses.mean() if mean else losses


def liger_available(device: torch.device) -> bool:
    """Whether loss_impl "liger" can run: a CUDA device and liger-kernel installed."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def liger_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """Mean cross-entropy through Liger-Kernel's fused linear cross-entropy (CUDA, Triton),
    with a float32 gradient accumulator where the installed version takes one. Raises
    RuntimeError when liger-kernel is not installed (`pip install liger-kernel`)."""
    return _liger_loss()(weight, x, targets)


@functools.cache
def _liger_loss() -> nn.Module:
    """Liger-Kernel's loss module, built once (not at every call, inside a compiled graph)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise RuntimeError(
            "runtime.loss_impl=liger needs liger-kernel (pip install liger-kernel, CUDA only): "
            "install it or use runtime.loss_impl=chunked"
        ) from e
    import inspect

    kwargs = {}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
        kwargs["accum_dtype"] = torch.float32
    return LigerFusedLinearCrossEntropyLoss(**kwargs)


class KVCache:
    """One layer's keys and values during generation, so that each new token costs a forward of
    that token alone instead of the whole context. Buffers of (B, n_head, block_size, head_dim),
    allocated at the first write in the dtype of the keys (bf16 under autocast); positions
    0..length-1 are filled. GPT.generate keeps one per layer."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.k: torch.Tensor | None = None  # (B, n_head, block_size, head_dim)
        self.v: torch.Tensor | None = None  # (B, n_head, block_size, head_dim)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_head, T, head_dim) at the next T positions; return the keys and
        values of every position so far, 2 × (B, n_head, length, head_dim)."""
        if self.k is None:
            B, n_head, _, head_dim = k.shape
            self.k = k.new_empty(B, n_head, self.block_size, head_dim)
            self.v = torch.empty_like(self.k)
        start, self.length = self.length, self.length + k.size(2)
        self.k[:, :, start : self.length] = k
        self.v[:, :, start : self.length] = v
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale_init = True
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv is not None:
            k, v = kv.append(k, v)  # 2 × (B, n_head, cached + T, head_dim)
        # Flash attention on CUDA (bf16/fp16), memory-efficient or math kernel elsewhere. Causal
        # over T new positions (training, a prefill: nothing cached before them); one new token
        # decoded after the cache attends to every cached position, so it needs no mask.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=kv is None or T > 1, dropout_p=self.dropout if self.training else 0.0
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale_init = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.checkpointed = False  # GPT.activation_checkpointing sets it

    def forward(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        if self.checkpointed and self.training and kv is None:
            # Keep only the block's input; recompute its activations in the backward. Inside
            # forward, so a compiled block (torch.compile, per block under FSDP) contains the
            # checkpoint and plans its recomputation, as torchtitan orders them.
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x, kv)

    def _forward(self, x: torch.Tensor, kv: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv)  # pre-LayerNorm residual block (GPT-2 §2.3)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


class GPT(nn.Module):
    """GPT-2 language model. Parameter names match the Hugging Face `GPT2LMHeadModel` layout
    (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...) so OpenAI weights map onto it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.embedding_rows, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.embedding_rows, bias=False)
        # Tied embeddings (GPT-2; Press & Wolf 2017): one matrix maps tokens in and logits out.
        self.lm_head.weight = self.transformer.wte.weight
        self.loss_impl: LossImpl = "chunked"  # runtime.loss_impl sets it
        self.loss_chunk_rows: int | None = None  # None: loss_chunk_rows() by the device's budget
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale_init", False):
                # Each block adds two branches to the residual stream, so its variance grows
                # with depth; GPT-2 §2.3 scales these projections by 1/sqrt(N), N = 2·n_layer.
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def activation_checkpointing(self) -> bool:
        """Whether training recomputes each block's activations in the backward instead of
        keeping them (runtime.activation_checkpointing): only the blocks' inputs are kept."""
        return all(block.checkpointed for block in self.transformer.h)

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for block in self.transformer.h:
            block.checkpointed = on

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied embedding once. With non_embedding=True the position
        embedding is left out, the N of the 6·N FLOPs-per-token estimate (Kaplan et al. 2020)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length seq_len:
        6·N + 12·n_layer·n_embd·seq_len (PaLM, Chowdhery et al. 2022, appendix B)."""
        cfg = self.cfg
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        all_logits: bool = False,
        reduction: str = "mean",
        cache: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) int64 token ids, T ≤ block_size. targets: (B, T) int64 or None.

        Returns (logits, loss). With targets: the cross-entropy in nats (float32), the mean over
        all B·T positions (a scalar) or, with reduction="none", per position (B, T) (evaluation,
        no gradient); logits are None, since the output layer and the loss are computed
        together without holding the (B, T, V) logits (self.loss_impl: chunked, or liger on
        CUDA), except with loss_impl "full", which returns them (B, T, V). Without targets:
        loss None and only the last position's logits (B, 1, V), for generation, or all of them
        (B, T, V) with all_logits (scoring, e.g. HellaSwag).

        cache (generation, see generate): one KVCache per layer; idx continues the positions
        cached, which the attention reads and extends: the whole prompt into an empty cache
        (the prefill), then one token at a time.
        """
        B, T = idx.shape
        start = cache[0].length if cache else 0  # positions before idx, held in the cache
        if start + T > self.cfg.block_size:
            raise ValueError(
                f"sequence length {start + T} exceeds block_size {self.cfg.block_size}"
            )
        if start and T > 1:
            raise ValueError(f"{T} tokens after {start} cached: a cache takes one token at a time")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(pos)
        )  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache else None)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x if all_logits else x[:, [-1], :]), None  # (B, T or 1, V)
        return self.loss(x, targets, reduction)

    def loss(
        self, x: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, loss) of the final hidden states x (B, T, C) against targets
        (B, T), by self.loss_impl; see forward."""
        flat_x, flat_t, weight = x.flatten(0, 1), targets.reshape(-1), self.lm_head.weight
        if self.loss_impl == "full":
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), flat_t, reduction=reduction)
            return logits, loss if reduction == "mean" else loss.view(targets.shape)
        if self.loss_impl == "liger" and reduction == "mean" and torch.is_grad_enabled():
            return None, liger_cross_entropy(flat_x, weight, flat_t)
        loss = chunked_cross_entropy(
            flat_x, weight, flat_t, reduction, self.loss_chunk_rows
        )  # () or (B·T,)
        return None, loss if reduction == "mean" else loss.view(targets.shape)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample max_new_tokens continuations of idx (B, T) int64; returns (B, T + max_new_tokens).

        temperature 0 is greedy decoding; top_k keeps the k most likely tokens; top_p keeps the
        smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019).
        Padding rows beyond vocab_size are never sampled. The context is cropped to block_size.

        use_cache keeps every layer's keys and values (KVCache): one forward of the prompt (the
        prefill), then one forward of each new token. The position embeddings are learned for
        positions 0..block_size-1 only, so a cached context cannot slide: once the prompt and
        the new tokens exceed block_size, each step recomputes from the last block_size tokens
        (a new prefill), as without the cache, which saves nothing from there on.
        use_cache=False runs the whole context at every step (the reference in the tests).
        """
        block_size, cache = self.cfg.block_size, None
        for _ in range(max_new_tokens):
            context = idx[:, -block_size:]  # (B, T ≤ block_size)
            if not use_cache:
                logits, _ = self(context)  # (B, 1, V)
            elif cache and cache[0].length == context.size(1) - 1:
                logits, _ = self(context[:, -1:], cache=cache)  # the newest token alone
            else:  # the prompt, or a window slid past block_size: no cached position holds
                cache = [KVCache(block_size) for _ in self.transformer.h]
                logits, _ = self(context, cache=cache)
            logits = logits[:, -1, : self.cfg.vocab_size].float()  # (B, vocab_size)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if top_p is not None and top_p < 1.0:
                    sorted_logits, order = torch.sort(logits, descending=True)
                    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
                    # Drop a token when the mass before it already reaches top_p (keeps ≥ 1).
                    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
                    drop = torch.empty_like(drop_sorted).scatter(1, order, drop_sorted)
                    logits = logits.masked_fill(drop, float("-inf"))
                probs = logits.softmax(dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def unwrap_model(model: torch.nn.Module) -> GPT:
    """The GPT inside a torch.compile (`_orig_mod`) and/or DDP (`module`) wrapper; the model
    itself when it is not wrapped. Raises TypeError for anything that is not a GPT inside."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a pipeline.model.GPT, got {type(model).__name__}")
        model = inner
    return model
