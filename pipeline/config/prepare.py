"""Schema of the prepare stage: where documents come from and how shards are cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from pipeline.model import PRESETS

MIN_SHARD_SIZE = max(preset.block_size for preset in PRESETS.values()) + 1
"""The smallest shard_size prepare accepts: 1,025 tokens, one training window of the largest
preset's block_size (1,024) + 1. The training loader takes its windows of block_size + 1
tokens inside one shard (a window never spans two), so shards shorter than that hold no window
and a split of thousands of tokens in such shards could not train at all."""


@dataclass
class SourceConfig:
    """Where documents come from. Hub and local sources share one code path (`datasets`
    streaming), so nothing is downloaded into a cache and local files behave like the hub."""

    name: str = MISSING
    """Short name, used as the shard file prefix and the default output folder."""
    kind: str = "hub"
    """`hub` (a dataset on the Hugging Face hub, streamed) or `local` (files matched by `paths`)."""
    dataset: str = "HuggingFaceFW/fineweb"
    """Hub dataset id (kind=hub)."""
    config_name: str | None = None
    """Hub dataset configuration, e.g. `sample-10BT` (kind=hub)."""
    revision: str | None = None
    """Hub git revision to pin (kind=hub); null = the default branch."""
    paths: list[str] = field(default_factory=list)
    """Files or glob patterns (kind=local): .parquet, .jsonl/.json(.gz), .txt."""
    split: str = "train"
    """Dataset split to read."""
    text_column: str = "text"
    """Column holding the document text (plain-text files always give `text`)."""
    max_documents: int | None = None
    """Stop after this many documents (null = all)."""
    shuffle_buffer: int = 0
    """Shuffle documents through a buffer of this many (0 = keep source order). A buffer larger
    than the source shuffles it completely."""
    shuffle_seed: int = 1337
    """Seed of the document shuffle."""

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ("hub", "local"):
            out.append(f"source.kind={self.kind!r} is unknown: use 'hub' or 'local'")
        if self.kind == "local" and not self.paths:
            out.append("source.kind=local needs source.paths, e.g. 'source.paths=[data/*.parquet]'")
        if self.max_documents is not None and self.max_documents < 1:
            out.append(f"source.max_documents={self.max_documents} must be >= 1 or null")
        if self.shuffle_buffer < 0:
            out.append(f"source.shuffle_buffer={self.shuffle_buffer} must be >= 0")
        return out


@dataclass
class PrepareConfig:
    """`python -m pipeline.prepare`: documents -> uint16 token shards + manifest.json."""

    source: SourceConfig = field(default_factory=SourceConfig)
    out_dir: str = "shards"
    """Parent folder of the output; shards go to `<out_dir>/<name>/`."""
    name: str | None = None
    """Output folder and shard prefix; null = source.name."""
    shard_size: int = 100_000_000
    """Tokens per shard (the last shard of each split holds the rest). llm.c uses 1e8; at least
    MIN_SHARD_SIZE."""
    val_tokens: int = 100_000_000
    """Validation split size in tokens: whole documents, taken first from the stream, until at
    least this many tokens (so no document is split between validation and training)."""
    num_workers: int = 0
    """Tokenizer processes; 0 = one per CPU core. Output bytes do not depend on it."""
    docs_per_task: int = 128
    """Documents handed to a worker at a time."""
    overwrite: bool = False
    """Delete existing output that was prepared with a different configuration."""
    progress: bool = True
    """Show a progress bar (documents, tokens, tokens/s)."""

    @property
    def dataset_name(self) -> str:
        return self.name or self.source.name

    def problems(self) -> list[str]:
        out = self.source.problems()
        if self.shard_size < MIN_SHARD_SIZE:
            out.append(
                f"shard_size={self.shard_size} must be >= {MIN_SHARD_SIZE:,} tokens: a training "
                f"window (block_size + 1 = {MIN_SHARD_SIZE:,} tokens for the GPT-2 presets) "
                "must fit inside one shard"
            )
        if self.val_tokens < 0:
            out.append(f"val_tokens={self.val_tokens} must be >= 0")
        if self.num_workers < 0:
            out.append(f"num_workers={self.num_workers} must be >= 0 (0 = all cores)")
        if self.docs_per_task < 1:
            out.append(f"docs_per_task={self.docs_per_task} must be >= 1")
        return out
