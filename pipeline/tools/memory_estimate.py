"""Peak training memory of one GPU, estimated analytically: by component, as a table, and the
largest micro-batch that fits a given memory. Bytes throughout (GIB to show them).

The estimate is for eager PyTorch (see `estimate_memory`); `pipeline.tools.probe` measures the
real thing on a CUDA device. Nothing runs at import time.
"""

from __future__ import annotations

from pipeline.errors import ConfigError, raise_if
from pipeline.model import ModelConfig, loss_chunk_rows
from pipeline.tools.render import table

GIB = 1 << 30
PRECISION_BYTES = {"bf16": 2, "fp32": 4}
"""Bytes per activation element for each trainer precision."""


def count_params(cfg: ModelConfig) -> int:
    """Parameters of GPT(cfg), tied embedding counted once (as `GPT.num_params()`).

    Per block: c_attn 3C² + c_proj C² + c_fc 4C² + c_proj 4C² = 12C² weights, 9C linear biases
    and two LayerNorms (C gains, C biases each); plus wte V·C, wpe block_size·C and ln_f.
    """
    c = cfg.n_embd
    layer_norm = 2 * c if cfg.bias else c
    block = 12 * c * c + (9 * c if cfg.bias else 0) + 2 * layer_norm
    return cfg.embedding_rows * c + cfg.block_size * c + cfg.n_layer * block + layer_norm


def estimate_memory(
    model: ModelConfig,
    micro_batch_size: int,
    block_size: int,
    precision: str = "bf16",
    world_size: int = 1,
    sharded: bool = False,
    optimizer: str = "adamw",
    loss_impl: str = "chunked",
    device_type: str = "cuda",
) -> dict[str, int]:
    """Estimated peak training memory of one GPU (device_type "cuda"; "cpu" for the chunk size
    the loss takes on a CPU), in bytes, by component, and their total.

    An estimate for eager PyTorch, not a measurement: it leaves out the CUDA context and
    kernels (~0.5 GiB), the caching allocator's fragmentation, cuBLAS and attention workspaces,
    and FSDP's all-gathered unit buffers; torch.compile can need less (it recomputes cheap
    element-wise ops in the backward instead of keeping them). Components, with N = parameters
    (`count_params`), s = block_size, b = micro_batch_size, h = n_embd, L = n_layer,
    V = padded vocabulary:

    - parameters, gradients: 4·N each (fp32 weights and fp32 .grad; autocast keeps the master
      weights in fp32). Gradients persist across the micro-steps of an accumulation.
    - optimizer: 8·N, AdamW's exp_avg and exp_avg_sq in fp32. Parameters, gradients and
      optimizer states together are the 16 bytes/parameter of mixed-precision Adam (ZeRO,
      Rajbhandari et al. 2020). optimizer="muon": 4 bytes (one momentum buffer) for the
      12·L·h² block matrices Muon trains, 8 for the rest (AdamW).
    - autocast_weights: 2·(12·L·h² + V·h) with bf16, 0 with fp32: the bf16 copies of the matmul
      weights that autocast makes in the forward and the matmuls keep for the backward.
    - activations: L·34·s·b·h bytes for 16-bit activations (Korthikanti et al. 2022, "Reducing
      Activation Recomputation in Large Transformer Models", per-layer activation memory
      s·b·h·(34 + 5·a·s/h)) without its 5·a·s²·b attention-score term, which flash attention
      (SDPA) does not store (Dao et al. 2022); plus 4·s·b·h for the inputs of the final
      LayerNorm and of the output projection, 2 bytes each as in the paper. fp32 doubles both.
      Counting the tensors eager PyTorch saves on CPU gives ~37·s·b·h bytes per block with
      bf16 autocast (the residual stream and the LayerNorm inputs stay fp32), so the 16-bit
      figure is a little low, and ~64.5·s·b·h with fp32.
    - logits: the output layer and the loss. loss_impl="chunked" (the default; see
      pipeline.model.chunked_cross_entropy): 8·b·s·h + 8·V·h + c·V·k with
      c = min(loss_chunk_rows(V, b·s, device_type), b·s): the float32 input gradient (b·s·h)
      and weight gradient
      (V·h) computed in the forward, each held to the backward and scaled there into a copy,
      plus one chunk of logits at a time, k = 4 bytes in fp32 (float32 logits, softmaxed in
      place) or 8 with bf16 (the bf16 product, its float32 copy and the bf16 cast of its
      gradient), as measured by tests/test_plan.py. loss_impl="full": b·s·V·(p + 12), with
      p = 2 (bf16) or 4 (fp32) bytes: the (B, T, V)
      logits in the compute dtype, held through the backward; the float32 log-softmax that
      cross-entropy keeps (`logits.float()` is a no-op in fp32); and, at the peak in
      log-softmax's backward, two float32 (B, T, V) gradients.

    sharded=True (FSDP2 full shard, ZeRO stage 3, as pipeline.training.runtime.shard applies
    it) divides parameters, gradients and optimizer states by world_size: the gradients are
    reduce-scattered at every micro-step, so only their float32 shards persist across a
    gradient accumulation. It has no autocast copies (the MixedPrecisionPolicy all-gathers bf16
    copies and computes on them) but adds
    - gathered: p·(R + 2·K), p = 2 bytes (bf16) or 4 (fp32): the all-gathered units. The
      root unit R (embeddings and final LayerNorm: V·h + block_size·h + ln_f) stays gathered
      from the forward to the end of the backward (FSDP2 does not reshard the root after the
      forward); of the blocks (K parameters each) the one computing and the one prefetched.
      The backward's unsharded gradients of one unit at a time, before their reduce-scatter,
      are smaller than the activations freed by then and are not counted.
    Activations and logits are per GPU either way. The total is the peak of a micro-step after
    the first of a gradient accumulation, when gradients are held and activations are all
    saved; `python -m pipeline.bench --only fsdp-memory` measures it against a real FSDP2 step
    (BENCHMARKS.md).
    Raises ConfigError (a ValueError) for an unknown precision, optimizer or loss_impl, or
    sizes out of range.
    """
    _check_estimate_args(model, micro_batch_size, block_size, precision, world_size)
    if optimizer not in ("adamw", "muon") or loss_impl not in ("chunked", "full"):
        raise ConfigError(
            f"cannot estimate memory: optimizer={optimizer!r} (adamw or muon), loss_impl="
            f"{loss_impl!r} (chunked or full)"
        )
    shards = world_size if sharded else 1
    n = count_params(model)
    h, s, b, v = model.n_embd, block_size, micro_batch_size, model.embedding_rows
    act = PRECISION_BYTES[precision]
    scale = act // 2  # 1 for 16-bit activations, 2 for fp32
    block_matrices = 12 * model.n_layer * h * h
    matmul_weights = block_matrices + v * h
    optimizer_bytes = 8 * n if optimizer == "adamw" else 8 * n - 4 * block_matrices
    if loss_impl == "full":
        logits = b * s * v * (act + 12)
    else:
        rows = min(loss_chunk_rows(v, b * s, device_type), b * s)
        logits = 8 * b * s * h + 8 * v * h + rows * v * (4 if act == 4 else 8)
    layer_norm = 2 * h if model.bias else h
    root = v * h + model.block_size * h + layer_norm
    block = (n - root) // model.n_layer
    out = {
        "parameters": -(-4 * n // shards),
        "gradients": -(-4 * n // shards),
        "optimizer": -(-optimizer_bytes // shards),
        "autocast_weights": 2 * matmul_weights if precision == "bf16" and not sharded else 0,
        "gathered": act * (root + 2 * block) if sharded else 0,
        "activations": scale * (34 * model.n_layer + 4) * s * b * h,
        "logits": logits,
    }
    out["total"] = sum(out.values())
    return out


def _check_estimate_args(
    model: ModelConfig, micro_batch_size: int, block_size: int, precision: str, world_size: int
) -> None:
    problems = list(model.problems())
    if precision not in PRECISION_BYTES:
        problems.append(f"precision={precision!r}: use one of {sorted(PRECISION_BYTES)}")
    if micro_batch_size < 1 or world_size < 1:
        problems.append(f"micro_batch_size={micro_batch_size}, world_size={world_size}: need >= 1")
    if not 1 <= block_size <= model.block_size:
        problems.append(
            f"block_size={block_size} must be between 1 and the model's block_size "
            f"{model.block_size}"
        )
    raise_if(problems)


def memory_table(
    model: ModelConfig,
    micro_batch_sizes: list[int],
    block_size: int,
    precision: str = "bf16",
    world_size: int = 1,
    sharded: bool = False,
    optimizer: str = "adamw",
) -> str:
    """The estimate of each micro-batch size as a markdown table, GiB per component and total."""
    rows = {
        b: estimate_memory(model, b, block_size, precision, world_size, sharded, optimizer)
        for b in micro_batch_sizes
    }
    keys = list(rows[micro_batch_sizes[0]])
    cells = [[str(b), *(f"{row[k] / GIB:.2f}" for k in keys)] for b, row in rows.items()]
    return table(["micro_batch_size", *keys], cells)


def largest_power_of_two_fitting(
    model: ModelConfig,
    block_size: int,
    memory_bytes: float,
    precision: str = "bf16",
    world_size: int = 1,
    sharded: bool = False,
    high: int = 1024,
    optimizer: str = "adamw",
) -> int:
    """The largest power of two b <= high whose estimated total fits in memory_bytes, or 0."""
    best, b = 0, 1
    while b <= high:
        est = estimate_memory(model, b, block_size, precision, world_size, sharded, optimizer)
        total = est["total"]
        if total > memory_bytes:
            break
        best, b = b, 2 * b
    return best


FIT_MARGIN = 0.9
"""Share of a GPU's memory the advice fills: the estimate leaves out the caching allocator's
fragmentation and workspaces, and counts 34 bytes per block element where eager bf16 saves ~37
(see estimate_memory), so a micro-batch estimated at the very limit would not train."""
GPU_MEMORY_GB = (24, 40, 48, 80)
"""Common GPU memory sizes (GB): RTX 3090/4090, A100 40GB, A6000/L40S, A100/H100 80GB."""


def largest_by_gpu(
    model: ModelConfig,
    block_size: int,
    precision: str = "bf16",
    optimizer: str = "adamw",
    gpus_gb: tuple[int, ...] = GPU_MEMORY_GB,
) -> dict[int, int]:
    """For each GPU size (GB), the largest power-of-two micro_batch_size whose estimated peak
    (estimate_memory, the chunked loss) fits in FIT_MARGIN of that many GiB less 1 GiB for the
    CUDA context (an 80 GB card leaves about 79 GiB to tensors); 0 = none."""
    return {
        gb: largest_power_of_two_fitting(
            model, block_size, FIT_MARGIN * (gb - 1) * GIB, precision, optimizer=optimizer
        )
        for gb in gpus_gb
    }
