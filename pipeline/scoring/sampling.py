"""Sampled text of a model: a seeded continuation of a prompt, shown during training and by
`python -m pipeline.sample`."""

from __future__ import annotations

import tiktoken
import torch

from pipeline.model import GPT


def generate_text(
    model: GPT,
    enc: tiktoken.Encoding,
    prompt: str,
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    seed: int = 1337,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = 0.95,
    use_cache: bool = True,
) -> str:
    """The prompt and a sampled continuation of it, decoded. An empty prompt samples
    unconditionally: from the end-of-text token, which starts every document in training (and
    is left out of the text, so the text is the continuation alone). Uses its own seeded
    generator, so sampling does not move the global RNG (and a resumed run stays identical).
    use_cache: generate with the KV cache (GPT.generate)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = enc.encode_ordinary(prompt)
    start = prompt_ids or [enc.eot_token]  # the model needs at least one token to condition on
    idx = torch.tensor([start], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = model.generate(
        idx, max_new_tokens, temperature, top_k, top_p, generator=generator, use_cache=use_cache
    )
    model.train(was_training)
    ids = out[0].tolist()[len(start) - len(prompt_ids) :]  # without the EOT of an empty prompt
    return enc.decode([i for i in ids if i < enc.n_vocab])
