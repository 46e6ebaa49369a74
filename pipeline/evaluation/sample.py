"""Sampling: `python -m pipeline.sample checkpoint=runs/NAME prompt='Once upon a time'`.

Prints continuations of a prompt from a checkpoint (a run folder's newest by default), from
OpenAI's GPT-2 weights (`pretrained=gpt2`, ..., `gpt2-xl`) or from a Hugging Face GPT-2 folder
(`pretrained=path`). temperature=0 decodes greedily (the same text every time); otherwise each
sample i is drawn with its own generator seeded with seed + i, after top-k and nucleus (top-p)
filtering (see pipeline.model.GPT.generate), with the KV cache unless use_cache=false.
"""

from __future__ import annotations

from pipeline.config import SampleConfig
from pipeline.data.tokenizer import get_encoding
from pipeline.errors import raise_if
from pipeline.evaluation.loading import load_for_eval
from pipeline.scoring.sampling import generate_text
from pipeline.training.runtime import resolve_device


def sample(cfg: SampleConfig) -> list[str]:
    """num_samples decoded texts, each the prompt followed by its continuation.
    Raises ConfigError, CheckpointError, HFError or HubError."""
    raise_if(cfg.problems())
    loaded = load_for_eval(cfg.checkpoint, cfg.pretrained)
    device = resolve_device(cfg.cpu)
    model, enc = loaded.model.to(device), get_encoding()
    return [
        generate_text(
            model,
            enc,
            cfg.prompt,
            cfg.max_new_tokens,
            device=device,
            seed=cfg.seed + i,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            use_cache=cfg.use_cache,
        )
        for i in range(cfg.num_samples)
    ]
