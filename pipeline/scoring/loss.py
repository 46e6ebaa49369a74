"""The validation loss of a model over fixed windows of the validation split (nats per token)
and its perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from pipeline.data.loader import ValidationWindows


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
