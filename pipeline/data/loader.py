"""Rank-aware batches over memory-mapped shards, resumable from a global sample index.

A sample is a window of block_size + 1 consecutive tokens inside one shard, taken at stride
block_size (windows overlap by one token, the next-token target of the last input; the
build-nanogpt/llm.c layout). A shard of n tokens gives (n - 1) // block_size samples; the tail
shorter than a window is left out (under block_size tokens per shard).

Order: epoch e visits the shards in a permutation seeded by (seed, e), and the samples of each
shard in a permutation seeded by (seed, e, shard). The whole order is a function of the seed
alone, so the position in it, a global sample index, is all a checkpoint needs. Every rank reads
a disjoint part of each global batch: on call c, rank r takes the samples at positions
position + r·micro_batch_size ... + micro_batch_size - 1 and every rank advances position by
world_size·micro_batch_size. With tokens_per_step fixed, one optimizer step consumes the same
positions for any world size, so a run can resume on a different number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.shards import Split
from pipeline.errors import ConfigError, ShardError


class TrainLoader:
    """Training batches (x, y), each (micro_batch_size, block_size) int64 on `device`.

    Shards stay memory-mapped for the loader's life (no per-step file opening). Raises
    ConfigError when the split has no complete window; next_batch raises ShardError, naming the
    file, for a token id >= vocab_size (when given).
    """

    def __init__(
        self,
        split: Split,
        block_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        device: torch.device | str = "cpu",
        vocab_size: int | None = None,
    ):
        self.shards, self.files, self.vocab_size = split.shards, split.files, vocab_size
        self.data = split.identity()  # absolute folder and manifest fingerprint, for checkpoints
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.device = torch.device(device)
        self.samples_per_shard = np.array(
            [max(0, (len(s) - 1) // block_size) for s in self.shards], dtype=np.int64
        )
        self.samples_per_epoch = int(self.samples_per_shard.sum())
        if self.samples_per_epoch == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise ConfigError(
                f"the longest {split.name} shard holds {longest:,} tokens, fewer than one "
                f"window of block_size + 1 = {block_size + 1:,} tokens (a window never spans "
                f"two shards; {len(self.shards)} shard(s), {split.num_tokens:,} tokens in "
                "all): "
                f"prepare again with shard_size >= {block_size + 1:,}, or lower block_size"
            )
        self.position = 0
        self._ahead: tuple[int, tuple | ShardError] | None = None  # prefetch(): position, batch
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, order, ends
        self._shard_perm: tuple[tuple[int, int], np.ndarray] | None = None  # (epoch, shard), perm

    # --- the order --------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard visiting order of `epoch` and the cumulative sample counts along it."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            ends = np.cumsum(self.samples_per_shard[order])
            self._epoch_order = (epoch, order, ends)
        return self._epoch_order[1], self._epoch_order[2]

    def _perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if self._shard_perm is None or self._shard_perm[0] != key:
            rng = np.random.default_rng([self.seed, epoch, shard])
            self._shard_perm = (key, rng.permutation(int(self.samples_per_shard[shard])))
        return self._shard_perm[1]

    def sample_location(self, index: int) -> tuple[int, int]:
        """(shard, first token offset) of the sample at global position `index`."""
        epoch, i = divmod(index, self.samples_per_epoch)
        order, ends = self._epoch(epoch)
        k = int(np.searchsorted(ends, i, side="right"))
        shard = int(order[k])
        local = i - (int(ends[k - 1]) if k else 0)
        return shard, int(self._perm(epoch, shard)[local]) * self.block_size

    # --- batches ----------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: x = window[:-1], y = window[1:], (B, T) int64 each
        (the one prefetch() read, when it did)."""
        ahead, self._ahead = self._ahead, None
        batch = ahead[1] if ahead is not None and ahead[0] == self.position else None
        if batch is None:
            batch = self._read(self.position)
        elif isinstance(batch, ShardError):
            raise batch
        self.position += self.world_size * self.micro_batch_size
        return batch

    def prefetch(self) -> None:
        """Read this rank's next micro-batch now and queue its copy to the device (on CUDA the
        copy runs while the device computes), for next_batch to return. Moves no position: a
        checkpoint taken in between records the same state. A token id the batch must not hold
        is raised by next_batch, when the batch is used."""
        if self._ahead is None:
            try:
                self._ahead = (self.position, self._read(self.position))
            except ShardError as e:
                self._ahead = (self.position, e)

    def _read(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch of this rank at global `position`, on the device."""
        B, T = self.micro_batch_size, self.block_size
        start = position + self.rank * B
        buf = np.empty((B, T + 1), dtype=np.int64)
        for j in range(B):
            shard, offset = self.sample_location(start + j)
            buf[j] = self.shards[shard][offset : offset + T + 1]
            check_vocab(buf[j], self.vocab_size, self.files[shard], offset)
        batch = torch.from_numpy(buf)
        if self.device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously with compute.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        """Position (global samples consumed) plus what must match on resume."""
        return {
            "position": self.position,
            "seed": self.seed,
            "block_size": self.block_size,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict, other_data: bool = False) -> None:
        """Continue from a saved position. Raises ValueError when the data or block size
        differs from the saved run (the order would not be the same); other_data=True accepts
        other data (data.allow_other_data), continuing at the same position in its order."""
        keys = ("seed", "block_size") if other_data else ("seed", "block_size", "samples_per_epoch")
        for key in keys:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint loader {key}={state[key]} but this run has "
                    f"{getattr(self, key)}: resume with the same data, block_size and seed"
                )
        self.position, self._ahead = int(state["position"]), None


class ValidationWindows:
    """The fixed validation set: the first `eval_tokens` tokens of the validation split (shards
    in manifest order, read as one stream), cut into consecutive windows of block_size + 1
    tokens at stride block_size; n = (min(eval_tokens, split tokens) - 1) // block_size windows,
    each scoring block_size next-token predictions. eval_tokens=None takes the whole split.
    The same windows serve periodic validation and `pipeline.evaluate`, for every checkpoint.
    Raises ConfigError when the first eval_tokens tokens hold no window; reading a window
    raises ShardError, naming the file, for a token id >= vocab_size (when given), as
    TrainLoader does.
    """

    def __init__(
        self,
        split: Split,
        block_size: int,
        eval_tokens: int | None = None,
        vocab_size: int | None = None,
    ):
        self.shards, self.files, self.vocab_size = split.shards, split.files, vocab_size
        self.block_size = block_size
        total = split.num_tokens if eval_tokens is None else min(eval_tokens, split.num_tokens)
        self.num_windows = max(0, (total - 1) // block_size)
        if self.num_windows == 0:
            raise ConfigError(
                f"validation split of {split.num_tokens} tokens (eval_tokens={eval_tokens}) "
                f"holds no window of {block_size + 1} tokens: raise eval_tokens or val_tokens"
            )
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # token offset of each shard

    @property
    def num_tokens(self) -> int:
        """Predicted tokens in the whole set."""
        return self.num_windows * self.block_size

    def window(self, i: int) -> np.ndarray:
        """Window i: (block_size + 1,) int64, possibly spanning two shards."""
        lo, hi = i * self.block_size, i * self.block_size + self.block_size + 1
        out, k = [], int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            take = min(hi, int(self.starts[k + 1])) - lo
            offset = lo - int(self.starts[k])
            out.append(self.shards[k][offset : offset + take])
            check_vocab(out[-1], self.vocab_size, self.files[k], offset)
            lo, k = lo + take, k + 1
        return np.concatenate(out).astype(np.int64)

    def rank_batches(self, micro_batch_size: int, rank: int = 0, world_size: int = 1):
        """Yield (x, y, weight) for rank's windows i ≡ rank (mod world_size): x, y (B, T) int64,
        weight (B,) float32 (0 for padding). Every rank yields the same number of batches (short
        ranks repeat a window with weight 0) so collective ops stay in step."""
        mine, weights = rank_share(self.num_windows, rank, world_size)
        for b in range(0, len(mine), micro_batch_size):
            idx = mine[b : b + micro_batch_size]
            buf = torch.from_numpy(np.stack([self.window(i) for i in idx]))
            yield buf[:, :-1], buf[:, 1:], torch.tensor(weights[b : b + micro_batch_size])


def rank_share(n: int, rank: int, world_size: int) -> tuple[list[int], list[float]]:
    """The indices of `rank`'s share of n items (i ≡ rank mod world_size) and their weights
    (1.0), padded to ceil(n / world_size) entries by repeating the last one with weight 0.0, so
    that every rank runs the same passes and collectives stay in step."""
    per_rank = -(-n // world_size)
    mine = list(range(rank, n, world_size))
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))
    return mine, weights


def check_vocab(tokens: np.ndarray, vocab_size: int | None, file: Path, offset: int) -> None:
    """Raise ShardError, naming the file and the tokens' span, when a token id of `tokens` (read
    from `file` at token `offset`) is not below vocab_size; no check when vocab_size is None."""
    if vocab_size is not None and tokens.max() >= vocab_size:
        raise ShardError(
            f"{file}: token id {tokens.max()} at tokens {offset}..{offset + len(tokens) - 1} is "
            f"not below vocab_size {vocab_size}: the shard is corrupt or from another "
            "tokenizer; prepare the data again"
        )
