"""Schemas of the evaluation and sampling stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.train import PRECISIONS


@dataclass
class EvaluateConfig:
    """`python -m pipeline.evaluate`."""

    checkpoint: str | None = None
    """A checkpoint folder, or a run folder (its newest complete checkpoint is used); or set
    `pretrained` instead."""
    pretrained: str | None = None
    """Instead of a checkpoint: OpenAI's GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
    from the Hugging Face hub or its cache) or a local Hugging Face GPT-2 folder (as written by
    `python -m pipeline.export checkpoint`). The val_loss task then needs shard_dir and
    block_size."""
    tasks: list[str] = field(default_factory=lambda: ["val_loss"])
    """What to measure: `val_loss` (validation loss, perplexity) and/or `hellaswag`."""
    hellaswag_path: str | None = None
    """HellaSwag validation file (rowanz hellaswag_val.jsonl or klosax's JSON lines); null =
    download rowanz/hellaswag's into ~/.cache/gpt2-fineweb-pipeline/hellaswag/."""
    hellaswag_limit: int | None = None
    """Score only the first this many HellaSwag items; null = all 10,042."""
    shard_dir: str | None = None
    """Validation data; null = the data the checkpoint was trained on (the absolute folder it
    records, whose manifest fingerprint must still match; older checkpoints: their
    data.shard_dir, relative to the working directory)."""
    eval_tokens: int | None = None
    """Validation tokens to score, at least one window (block_size + 1); null = the whole
    validation split."""
    micro_batch_size: int = 8
    """Windows (val_loss), or HellaSwag items of 4 rows each (hellaswag), per forward pass."""
    block_size: int | None = None
    """Window length in tokens; null = the block_size the checkpoint was trained with."""
    precision: str = "auto"
    """bf16, fp32, or auto (bf16 on a CUDA device that supports it; see
    pipeline.training.runtime.resolve_precision)."""
    cpu: bool = False
    """Evaluate on the CPU even when a GPU is present."""
    sample_tokens: int = 64
    """Tokens generated after the prompt below (0 = no sample)."""
    prompt: str = "The meaning of life is"
    seed: int = 1337

    def problems(self) -> list[str]:
        out = []
        if self.micro_batch_size < 1:
            out.append(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.precision not in PRECISIONS:
            out.append(f"precision={self.precision!r}: use auto, bf16 or fp32")
        if self.eval_tokens is not None and self.eval_tokens < 2:
            out.append(f"eval_tokens={self.eval_tokens} must be >= 2 or null")
        elif self.block_size and self.eval_tokens is not None:
            out += eval_tokens_problems(self.eval_tokens, self.block_size)
        return out


def eval_tokens_problems(eval_tokens: int | None, block_size: int) -> list[str]:
    """The problem of an eval_tokens below one window of block_size + 1 tokens, or []."""
    if eval_tokens is None or eval_tokens > block_size:
        return []
    return [
        f"eval_tokens={eval_tokens} is below one validation window of block_size + 1 = "
        f"{block_size + 1} tokens: set eval_tokens >= {block_size + 1}, or null for the whole "
        "validation split"
    ]


# --------------------------------------------------------------------------- sample


@dataclass
class SampleConfig:
    """`python -m pipeline.sample`."""

    checkpoint: str | None = None
    """A checkpoint folder, or a run folder (its newest complete checkpoint is used)."""
    pretrained: str | None = None
    """Instead of a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl (OpenAI's weights from
    the Hugging Face hub or its cache) or a local Hugging Face GPT-2 folder."""
    prompt: str = "Hello, I'm a language model,"
    max_new_tokens: int = 64
    """Tokens generated after the prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy decoding (deterministic)."""
    top_k: int | None = 200
    """Sample among the k most likely tokens; null = all."""
    top_p: float | None = 0.95
    """Sample among the most likely tokens holding this much probability; null = all."""
    seed: int = 1337
    """Sample i uses a generator seeded with seed + i."""
    num_samples: int = 1
    cpu: bool = False
    """Sample on the CPU even when a GPU is present."""
    use_cache: bool = True
    """Keep every layer's keys and values while generating (KV cache: each new token costs one
    position's forward); false recomputes the whole context for every token (same tokens,
    slower)."""

    def problems(self) -> list[str]:
        out = []
        if (self.checkpoint is None) == (self.pretrained is None):
            out.append("set exactly one of checkpoint=runs/NAME and pretrained=gpt2")
        if self.max_new_tokens < 1 or self.num_samples < 1:
            out.append("max_new_tokens and num_samples must be >= 1")
        if self.temperature < 0:
            out.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            out.append(f"top_p={self.top_p} must be in (0, 1] or null")
        return out
