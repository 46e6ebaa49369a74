"""HellaSwag (Zellers et al. 2019) scored completion-style, as in the GPT-2/GPT-3 evaluations.

Each item is a context and four endings, one of them right. Every ending is scored by the
cross-entropy of its tokens given the context: the row `enc.encode(ctx) + enc.encode(" " +
ending)` is run through the model and the next-token losses at the ending's positions are
summed (nats) and averaged (nats per ending token). The prediction is the ending with the lowest
loss:

- `acc`: lowest summed loss, i.e. the most likely ending (unnormalised log-likelihood);
- `acc_norm`: lowest mean loss per ending *token* (token-length normalised).

These are the definitions of llm.c `dev/data/hellaswag.py` and build-nanogpt `hellaswag.py`
(which report 0.2859 / 0.2955 for OpenAI's gpt2 124M and 0.3842 / 0.4893 for gpt2-xl on the
10,042 validation items). The EleutherAI lm-evaluation-harness has the same `acc`, but its
`acc_norm` divides the log-likelihood by the ending's length in characters ("byte-length
normalised", Gao 2021, "Multiple Choice Normalization in LM Evaluation"), and it scores the
endings as answers to a prompt rather than as completions, so its numbers differ (gpt2: 0.2892 /
0.3114). This module follows llm.c and build-nanogpt. The losses are taken over the real
vocabulary only (the padding columns of the output layer are dropped before the softmax, as
llm.c's softmax runs over V, not the padded Vp).

Data: the upstream `hellaswag_val.jsonl` (rowanz/hellaswag; fields ind, activity_label, ctx_a,
ctx_b, ctx, split, split_type, label, endings, source_id) and klosax's JSON-lines conversion
(idx, activity_label, ctx, label, endings; WikiHow markers removed, so its accuracies come out
close to, not exactly at, the published ones) are both read, the layout detected line by line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data.loader import rank_share
from pipeline.data.tokenizer import EOT, get_encoding
from pipeline.errors import HellaSwagError
from pipeline.files import atomic_path
from pipeline.model import unwrap_model

UPSTREAM_VAL_URL = (
    "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
)
"""The validation split as llm.c and build-nanogpt download it (10,042 items, about 11 MB)."""
NUM_ENDINGS = 4


@dataclass(frozen=True)
class Item:
    """One HellaSwag question: the context, its four endings and the index of the right one."""

    ctx: str
    endings: tuple[str, ...]
    label: int
    layout: str = "upstream"
    """`upstream` (rowanz hellaswag_*.jsonl) or `klosax` (idx field, preprocessed text)."""


@dataclass(frozen=True)
class EncodedItem:
    """The four candidate rows of an item as token ids: rows[i] = context + ending i (left-cut
    to the model's window), ending_lengths[i] = tokens of ending i at the end of rows[i]."""

    rows: tuple[tuple[int, ...], ...]
    ending_lengths: tuple[int, ...]
    label: int


# --------------------------------------------------------------------------- reading


def _layout(row: dict) -> str:
    """`klosax` for klosax's conversion (an `idx` field), else `upstream`."""
    return "klosax" if "idx" in row and "ind" not in row else "upstream"


def _context(row: dict) -> str:
    """The whole context: `ctx`, or (upstream rows without it) ctx_a followed by ctx_b."""
    if "ctx" in row:
        return row["ctx"]
    if "ctx_a" in row:
        return f"{row['ctx_a']} {row.get('ctx_b', '')}".strip()
    raise KeyError("ctx")


def parse_item(row: dict) -> Item:
    """An Item from one decoded JSON line of either layout. Raises KeyError for a missing field
    and ValueError for a wrong type or value."""
    ctx, endings, label = _context(row), row["endings"], row["label"]
    if not isinstance(ctx, str):
        raise ValueError(f"ctx must be a string, got {type(ctx).__name__}")
    if not (
        isinstance(endings, list)
        and len(endings) == NUM_ENDINGS
        and all(isinstance(e, str) for e in endings)
    ):
        raise ValueError(f"endings must be a list of {NUM_ENDINGS} strings, got {endings!r:.80}")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"label must be an integer in 0..{NUM_ENDINGS - 1}, got {label!r}")
    return Item(ctx=ctx, endings=tuple(endings), label=label, layout=_layout(row))


def load_items(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all when None) of a HellaSwag JSON-lines file, either layout,
    in file order; blank lines are skipped.

    Raises HellaSwagError for a missing or empty file, or a line that is not a JSON object with
    ctx (or ctx_a/ctx_b), endings (4 strings) and label (0-3), naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(
            f"{path} does not exist: pass the HellaSwag validation file (hellaswag_val.jsonl from "
            f"{UPSTREAM_VAL_URL}, or shared/data/hellaswag/hellaswag_val_klosax.jsonl)"
        )
    if limit is not None and limit < 1:
        raise HellaSwagError(f"limit={limit} must be >= 1 or None")
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_read_line(line, path, number))
    if not items:
        raise HellaSwagError(f"{path} holds no items: is it a HellaSwag JSON-lines file?")
    return items


def _read_line(line: str, path: Path, number: int) -> Item:
    where = f"{path}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(row).__name__}")
    try:
        return parse_item(row)
    except KeyError as e:
        hint = " (test-split files have no labels)" if e.args[0] == "label" else ""
        raise HellaSwagError(f"{where}: missing field {e.args[0]!r}{hint}") from None
    except ValueError as e:
        raise HellaSwagError(f"{where}: {e}") from None


def default_path() -> Path:
    """Where the validation split is downloaded when no path is given: the user's cache
    ($XDG_CACHE_HOME or ~/.cache), outside the repository."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gpt2-fineweb-pipeline" / "hellaswag" / "hellaswag_val.jsonl"


def resolve_path(path: str | os.PathLike | None) -> Path:
    """`path` itself, or (None) default_path(), downloaded from UPSTREAM_VAL_URL when missing
    (atomically, through pipeline.files: never a partial file). Raises HellaSwagError when the
    download fails (e.g. offline), saying which path to pass instead."""
    if path is not None:
        return Path(path)
    dest = default_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (
            urllib.request.urlopen(UPSTREAM_VAL_URL, timeout=60) as r,
            atomic_path(dest) as tmp,
            open(tmp, "wb") as f,
        ):
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise HellaSwagError(
            f"downloading {UPSTREAM_VAL_URL} failed ({e}); without network pass the file, e.g. "
            "hellaswag_path=../shared/data/hellaswag/hellaswag_val_klosax.jsonl"
        ) from None
    return dest


# --------------------------------------------------------------------------- tokens


def encode_item(item: Item, encode: Callable[[str], list[int]], max_row: int) -> EncodedItem:
    """Tokenize an item's four candidates (llm.c `render_example`): context = encode(ctx),
    ending i = encode(" " + ending) (GPT-2's BPE attaches the space to the next word).

    A row longer than max_row tokens loses tokens from the left of its context (the ending is
    kept whole). max_row = block_size + 1: the model reads row[:-1] and predicts row[1:].
    Raises HellaSwagError (exit 2) when an ending alone needs more than max_row - 1 tokens.
    """
    ctx = encode(item.ctx)
    rows, lengths = [], []
    for ending in item.endings:
        end = encode(" " + ending)
        if len(end) >= max_row:
            raise HellaSwagError(
                f"an ending of {len(end)} tokens does not fit the model's block_size "
                f"{max_row - 1} with one token of context: score HellaSwag with a model of a "
                "longer block_size, or leave it out (evaluate: tasks=[val_loss]; training: "
                "eval.hellaswag_items=0)"
            )
        rows.append(tuple((ctx + end)[-max_row:]))
        lengths.append(len(end))
    return EncodedItem(rows=tuple(rows), ending_lengths=tuple(lengths), label=item.label)


def collate(batch: Sequence[EncodedItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the candidates of `batch` into x, y, mask, each (4·len(batch), T): x = row[:-1],
    y = row[1:] (int64, right-padded with EOT), mask (bool) true where y is an ending token.
    T = the longest row of the batch minus one. Padding comes after every real
    token, so causal attention keeps it from changing the logits of the real positions.
    """
    rows = [(r, n) for item in batch for r, n in zip(item.rows, item.ending_lengths)]
    T = max(len(r) for r, _ in rows) - 1
    x = torch.full((len(rows), T), EOT, dtype=torch.long)
    y = torch.full((len(rows), T), EOT, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (row, n_end) in enumerate(rows):
        L = len(row) - 1  # predictions in this row
        t = torch.tensor(row, dtype=torch.long)
        x[i, :L], y[i, :L] = t[:-1], t[1:]
        mask[i, L - n_end : L] = True  # targets of the ending's tokens
    return x, y, mask


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def candidate_losses(
    model: torch.nn.Module,
    batch: Sequence[EncodedItem],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy (nats; float32, each (len(batch), 4)) of every ending
    given its context, in one forward pass of `model` (in whatever mode it is in).

    The softmax runs over the model's real vocabulary (vocab_size columns), not its padding.
    """
    vocab_size = unwrap_model(model).cfg.vocab_size
    x, y, mask = (t.to(device) for t in collate(batch))
    with autocast():
        logits, _ = model(x, all_logits=True)  # (B, T, V)
    picked = logits[mask][:, :vocab_size].float()  # (N ending tokens, vocab_size)
    nll = F.cross_entropy(picked, y[mask], reduction="none")  # (N,)
    row = torch.arange(x.size(0), device=device).unsqueeze(1).expand_as(mask)[mask]  # (N,)
    sums = torch.zeros(x.size(0), device=device).index_add_(0, row, nll)  # (B,)
    means = sums / mask.sum(dim=1)
    return sums.view(-1, NUM_ENDINGS), means.view(-1, NUM_ENDINGS)


@torch.no_grad()
def evaluate_hellaswag(
    model: torch.nn.Module,
    items: Sequence[Item],
    device: torch.device | str = "cpu",
    batch_items: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """HellaSwag accuracy of a GPT (eager, compiled or DDP-wrapped) on `items`.

    Returns {"acc": float, "acc_norm": float, "n": int}: the fraction of items whose right
    ending has the lowest summed loss (acc) and the lowest mean loss per ending token
    (acc_norm), over all n items. Each rank scores items i ≡ rank (mod world_size), 4·batch_items
    rows per forward pass; `reduce` sums a tensor over ranks (None for one process). Every rank
    runs the same number of passes (short ranks repeat an item with weight 0) so collectives
    stay in step. Each batch is padded to its own longest row. The model is left in the mode it
    had.
    Raises ValueError for no items, HellaSwagError (naming the item) for an ending longer
    than the block size.
    """
    if not items:
        raise ValueError("no HellaSwag items to score")
    cfg = unwrap_model(model).cfg
    enc = get_encoding()
    # encode_ordinary equals llm.c's enc.encode on this text (it has no special tokens).
    encoded = []
    for i, item in enumerate(items):
        try:
            encoded.append(encode_item(item, enc.encode_ordinary, cfg.block_size + 1))
        except HellaSwagError as e:
            raise HellaSwagError(f"HellaSwag item {i}: {e}") from None
    mine, weights = rank_share(len(encoded), rank, world_size)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # acc, acc_norm, items
    was_training = model.training
    model.eval()
    for b in range(0, len(mine), batch_items):
        idx, w = mine[b : b + batch_items], weights[b : b + batch_items]
        batch = [encoded[i] for i in idx]
        sums, means = candidate_losses(model, batch, device, autocast)
        labels = torch.tensor([e.label for e in batch], device=device)
        weight = torch.tensor(w, dtype=torch.float64, device=device)
        counts[0] += ((sums.argmin(dim=1) == labels) * weight).sum()
        counts[1] += ((means.argmin(dim=1) == labels) * weight).sum()
        counts[2] += weight.sum()
    model.train(was_training)
    if reduce is not None:
        counts = reduce(counts)
    n = int(counts[2].item())
    return {"acc": counts[0].item() / n, "acc_norm": counts[1].item() / n, "n": n}
