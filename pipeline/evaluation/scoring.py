"""Scoring a model: the validation loss over fixed windows and sampled text. Used by training
(its periodic validation) and by the evaluation stage; imports nothing of either."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import tiktoken
import torch

from pipeline.data.loader import ValidationWindows
from pipeline.model import GPT


def perplexity(loss: float) -> float:
    """exp(loss) for a mean cross-entropy in nats/token; math.inf once that overflows a float
    (loss > ~709.78, a diverged model), and nan for a nan loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    windows: ValidationWindows,
    micro_batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Mean cross-entropy in nats per predicted token over all windows, and the number of
    predicted tokens. Each rank scores its share of the windows (see
    ValidationWindows.rank_batches); `reduce` sums a tensor over ranks (None for one process).
    The model is left in train mode."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum (nats), tokens
    for x, y, weight in windows.rank_batches(micro_batch_size, rank, world_size):
        x, y, weight = x.to(device), y.to(device), weight.to(device)
        with autocast():
            _, nll = model(x, y, reduction="none")  # (B, T) nats, float32
        per_window = nll.sum(dim=1)  # (B,)
        sums[0] += (per_window * weight).sum()
        sums[1] += weight.sum() * y.size(1)
    if reduce is not None:
        sums = reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item(), int(sums[1].item())


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
