"""The prepare benchmark: tokens/s of the prepare stage against tiktoken alone, and its memory.

`pipeline.data.writer.prepare` on the FineWeb sample (one worker process per core) against
tiktoken `encode_ordinary_batch` on the same documents with as many threads, in interleaved
rounds; then the peak memory of prepare in a fresh process at several input sizes (copies of
the documents). Times in seconds, memory in bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PrepareConfig, SourceConfig
from pipeline.data.shards import MANIFEST
from pipeline.data.tokenizer import get_encoding, resolve_num_workers
from pipeline.data.writer import prepare
from pipeline.tools.bench.child import run_child
from pipeline.tools.host import cpu_seconds, maxrss_bytes, peak_rss_self, rss_self
from pipeline.tools.render import MIB, fmt_mib, fmt_n, fmt_s, table

SHARD_SIZE = 1_000_000
"""Tokens per shard, as the demo prepares the sample (Makefile DEMO_PREPARE)."""
VAL_TOKENS = 250_000
"""Validation split of the demo; a tenth of the tokens for smaller inputs."""
ROW_GROUP_ROWS = 512
"""Rows per parquet row group of the written inputs, the layout of the FineWeb sample file."""


def load_documents(path: Path, limit: int | None = None) -> list[str]:
    """The `text` column of a parquet file, the first `limit` rows (None = all)."""
    texts = pq.read_table(path, columns=["text"]).column("text")
    return texts.slice(0, limit).to_pylist() if limit else texts.to_pylist()


def documents_source(sample: Path, limit: int | None, work: Path) -> tuple[list[str], Path]:
    """(documents, a parquet file holding exactly them): the sample itself when all of it is
    used, else its first `limit` documents written to `work`."""
    docs = load_documents(sample, limit)
    if limit is None or limit >= pq.ParquetFile(sample).metadata.num_rows:
        return docs, sample
    return docs, write_documents(docs, work / "docs_x1.parquet")


def write_documents(docs: list[str], path: Path) -> Path:
    """Write docs as a parquet file with one `text` column, ROW_GROUP_ROWS rows per group."""
    pq.write_table(pa.table({"text": docs}), path, row_group_size=ROW_GROUP_ROWS)
    return path


def prepare_config(source: Path, out_dir: Path, tokens: int, workers: int) -> PrepareConfig:
    """The benchmark's prepare settings: the demo's shard size and validation split (a tenth
    of `tokens` for smaller inputs), source order, no progress bar."""
    return PrepareConfig(
        source=SourceConfig(name="bench", kind="local", paths=[str(source)]),
        out_dir=str(out_dir),
        shard_size=SHARD_SIZE,
        val_tokens=min(VAL_TOKENS, tokens // 10),
        num_workers=workers,
        progress=False,
    )


def manifest_totals(shard_dir: Path) -> tuple[int, int]:
    """(documents, tokens) over both splits of a prepared folder."""
    splits = json.loads((shard_dir / MANIFEST).read_text())["splits"].values()
    return sum(s["documents"] for s in splits), sum(s["tokens"] for s in splits)


@dataclass(frozen=True)
class Timing:
    """Wall and CPU seconds of one call; CPU counts every thread of this process and the
    child processes it joined meanwhile (prepare's workers)."""

    wall_s: float
    cpu_s: float

    @property
    def cores(self) -> float:
        """Cores busy on average: CPU seconds per wall second."""
        return self.cpu_s / self.wall_s


@contextlib.contextmanager
def timed(into: list[Timing]) -> Iterator[None]:
    """Append the Timing of the block to `into`."""
    cpu0, start = process_cpu_s(), time.perf_counter()
    yield
    into.append(Timing(time.perf_counter() - start, process_cpu_s() - cpu0))


def process_cpu_s() -> float:
    """CPU seconds of this process and its joined children so far."""
    return cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)


def tiktoken_tokens(docs: list[str], threads: int) -> int:
    """Tokens of encode_ordinary_batch(docs, num_threads=threads), plus one EOT per document
    as the shards hold them."""
    ids = get_encoding().encode_ordinary_batch(docs, num_threads=threads)
    return sum(map(len, ids)) + len(docs)


def quiet_prepare(cfg: PrepareConfig) -> Path:
    """prepare(cfg) with its summary line silenced; returns the output folder."""
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare(cfg)


@dataclass
class PrepareRun:
    """prepare() on one input size, in a fresh process. Memory in bytes, time in seconds."""

    scale: int
    """Copies of the documents in the input."""
    documents: int
    tokens: int
    seconds: float
    """Wall time of the prepare() call alone (not the interpreter start or imports)."""
    baseline_rss: int | None
    """RSS of the process just before prepare(): interpreter and imports."""
    main_peak_rss: int
    """Peak RSS of the process that runs prepare() (`peak_rss_self`)."""
    worker_peak_rss: int
    """Largest peak RSS among its worker processes (RUSAGE_CHILDREN after the pool is joined:
    the maximum over the children, not their sum)."""
    main_cpu_s: float
    worker_cpu_s: float
    """CPU seconds of the main process and of all workers together, during prepare()."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prepare_child(params: dict[str, Any]) -> dict[str, Any]:
    cfg = prepare_config(
        Path(params["source"]), Path(params["out_dir"]), params["tokens"], params["workers"]
    )
    baseline = rss_self()
    main0, workers0 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = quiet_prepare(cfg)
    seconds = time.perf_counter() - start
    documents, tokens = manifest_totals(out)
    return {
        "documents": documents,
        "tokens": tokens,
        "seconds": seconds,
        "baseline_rss": baseline,
        "main_peak_rss": peak_rss_self(),
        "worker_peak_rss": maxrss_bytes(resource.RUSAGE_CHILDREN),
        "main_cpu_s": cpu_seconds(resource.RUSAGE_SELF) - main0,
        "worker_cpu_s": cpu_seconds(resource.RUSAGE_CHILDREN) - workers0,
    }


def prepare_in_child(
    source: Path, out_dir: Path, scale: int, tokens: int, workers: int
) -> PrepareRun:
    """PrepareRun of prepare() on `source` (scale copies of the documents, `tokens` tokens) in
    a fresh process; its output folder is deleted afterwards."""
    params = {"source": str(source), "out_dir": str(out_dir), "tokens": tokens, "workers": workers}
    result = run_child(prepare_child, params)
    shutil.rmtree(out_dir, ignore_errors=True)
    return PrepareRun(scale=scale, **result)


@dataclass
class PrepareResult:
    """The prepare benchmark: interleaved rounds on the documents, then memory at each scale."""

    documents: int
    tokens: int
    """Document tokens plus one EOT per document: what the shards hold."""
    workers: int
    """Worker processes of prepare, and threads of tiktoken."""
    source: str
    tiktoken: list[Timing]
    prepare: list[Timing]
    """Each round's timing."""
    sizes: list[PrepareRun]
    shard_dir: str
    """Output of the last round, kept for the loader and train benchmarks."""

    @property
    def tiktoken_tokens_per_s(self) -> float:
        return self.tokens / statistics.median(t.wall_s for t in self.tiktoken)

    @property
    def prepare_tokens_per_s(self) -> float:
        return self.tokens / statistics.median(t.wall_s for t in self.prepare)

    @property
    def ratio(self) -> float:
        """Prepare tokens/s over tiktoken tokens/s (medians)."""
        return self.prepare_tokens_per_s / self.tiktoken_tokens_per_s

    @property
    def marginal_tokens_per_s(self) -> float | None:
        """Tokens/s of the extra input between the smallest and largest size (start-up and
        the last batches cancel out); None with one size or when the larger was not slower."""
        small, large = self.sizes[0], self.sizes[-1]
        if len(self.sizes) < 2 or large.seconds <= small.seconds:
            return None
        return (large.tokens - small.tokens) / (large.seconds - small.seconds)


def prepare_rounds(
    docs: list[str], source: Path, work: Path, rounds: int, workers: int
) -> tuple[int, list[Timing], list[Timing], Path]:
    """Alternate tiktoken and prepare, the order swapped every round, after one untimed
    tiktoken pass: (tokens, tiktoken timings, prepare timings, output folder of the last
    round). Raises RuntimeError when the shards do not hold exactly tiktoken's tokens."""
    tiktoken, prepared = [], []
    tokens = tiktoken_tokens(docs, workers)
    for r in range(rounds):
        cfg = prepare_config(source, work / f"round{r}", tokens, workers)
        calls = [
            (tiktoken, partial(tiktoken_tokens, docs, workers)),
            (prepared, partial(quiet_prepare, cfg)),
        ]
        for timings, call in calls if r % 2 == 0 else calls[::-1]:
            with timed(timings):
                call()
        if r:  # only the last round's shards are kept
            shutil.rmtree(work / f"round{r - 1}")
        print(
            f"prepare round {r + 1}/{rounds}: tiktoken {tiktoken[-1].wall_s:.2f} s, "
            f"prepare {prepared[-1].wall_s:.2f} s",
            flush=True,
        )
    out = Path(cfg.out_dir) / cfg.dataset_name
    if manifest_totals(out)[1] != tokens:
        raise RuntimeError(f"{out} holds {manifest_totals(out)[1]} tokens, tiktoken {tokens}")
    return tokens, tiktoken, prepared, out


def bench_prepare(
    docs: list[str],
    source: Path,
    work: Path,
    rounds: int = 3,
    scales: tuple[int, ...] = (1, 4, 16),
    workers: int = 0,
) -> PrepareResult:
    """Time prepare on `source` (a parquet file of exactly docs) against tiktoken on docs,
    then measure prepare at each scale (copies of docs) in a fresh process. workers=0: one per
    usable core. Temporary files go to `work`."""
    workers = resolve_num_workers(workers)
    tokens, tiktoken, prepared, out = prepare_rounds(docs, source, work / "rounds", rounds, workers)
    sizes = []
    for scale in scales:
        path = source if scale == 1 else write_documents(docs * scale, work / f"x{scale}.parquet")
        run = prepare_in_child(path, work / f"size{scale}", scale, tokens * scale, workers)
        print(
            f"prepare x{scale}: {run.seconds:.2f} s, peak RSS main "
            f"{run.main_peak_rss / MIB:.0f} MiB, worker {run.worker_peak_rss / MIB:.0f} MiB",
            flush=True,
        )
        sizes.append(run)
    return PrepareResult(
        len(docs), tokens, workers, str(source), tiktoken, prepared, sizes, str(out)
    )


def make_shards(docs: list[str], source: Path, work: Path) -> Path:
    """Shards of docs from `source` (for --only without prepare), prepared once, untimed."""
    tokens = tiktoken_tokens(docs, resolve_num_workers(0))
    return quiet_prepare(prepare_config(source, work / "shards", tokens, 0))


# --------------------------------------------------------------------------- markdown


def _timing_row(what: str, timings: list[Timing], tokens_per_s: float) -> list[str]:
    walls = [t.wall_s for t in timings]
    cores = statistics.median(t.cores for t in timings)
    return [
        what,
        ", ".join(map(fmt_s, walls)),
        fmt_s(statistics.median(walls)),
        f"{cores:.2f}",
        fmt_n(tokens_per_s),
    ]


def render_prepare(r: PrepareResult) -> str:
    """The prepare section: throughput against tiktoken, then memory at each input size."""
    w = r.workers
    rows = [
        _timing_row(
            f"tiktoken `encode_ordinary_batch`, {w} threads", r.tiktoken, r.tiktoken_tokens_per_s
        ),
        _timing_row(f"prepare stage, {w} worker processes", r.prepare, r.prepare_tokens_per_s),
        ["**prepare / tiktoken** (target ≥ 90%)", "", "", "", f"**{100 * r.ratio:.0f}%**"],
    ]
    text = [
        "### prepare: documents to shards",
        "",
        f"{r.documents:,} FineWeb sample documents, {r.tokens:,} tokens (document tokens plus "
        f"one EOT each). The prepare stage is `pipeline.data.writer.prepare` on "
        f"`{Path(r.source).name}` (read through `datasets`, tokenized by {w} worker processes, "
        f"shards of {SHARD_SIZE:,} tokens written and hashed, manifest) into a temporary "
        "folder, progress bar off; tiktoken "
        f"is `encode_ordinary_batch(docs, num_threads={w})` on the same documents, already in "
        f"memory. Rounds: {len(r.prepare)}, each timing both, in alternating order; medians. "
        "Cores busy: CPU seconds (all threads, and the joined worker processes) per wall "
        "second; below the core count, the run waited or other processes had the cores.",
        "",
        table(["what", "seconds per round", "median s", "cores busy", "tokens/s"], rows),
        "",
        render_prepare_sizes(r),
    ]
    return "\n".join(text)


def render_prepare_sizes(r: PrepareResult) -> str:
    """The memory and scaling table of the prepare section, with what it measures."""
    rows = [
        [
            f"sample ×{s.scale}",
            f"{s.documents:,}",
            f"{s.tokens:,}",
            fmt_s(s.seconds),
            fmt_n(s.tokens_per_s),
            fmt_mib(s.baseline_rss),
            fmt_mib(s.main_peak_rss),
            fmt_mib(s.worker_peak_rss),
            f"{s.main_cpu_s:.2f}",
            f"{s.worker_cpu_s:.2f}",
        ]
        for s in r.sizes
    ]
    header = [
        "input",
        "documents",
        "tokens",
        "prepare s",
        "tokens/s",
        "main RSS before",
        "main peak RSS",
        f"largest of {r.workers} workers' peak RSS",
        "main CPU s",
        "workers CPU s",
    ]
    lines = [
        table(header, rows),
        "",
        "Each size runs in a fresh process (`python -c` calling `prepare()`; the input is the "
        "sample's documents repeated, a parquet file with the sample's row groups of "
        f"{ROW_GROUP_ROWS} rows). Main RSS before: that process's resident memory just before "
        "`prepare()` (interpreter and imports, torch among them). Main peak RSS: its "
        "high-water mark, VmHWM of /proc/self/status (its own `ru_maxrss` is not used: Linux "
        "carries the launching process's peak into a process started by fork and exec). "
        "Workers' peak RSS: `getrusage(RUSAGE_CHILDREN).ru_maxrss` read in that process after "
        "the worker pool was joined, i.e. the largest single worker's peak, not a sum; workers "
        "are forked from the main process, so most of their resident pages are shared with "
        "it. CPU seconds: `getrusage` user + system time during `prepare()`.",
    ]
    marginal = r.marginal_tokens_per_s
    if marginal:
        small = r.sizes[0]
        fixed = small.seconds - small.tokens / marginal
        lines += [
            "",
            f"Steady state (the extra input of ×{r.sizes[-1].scale} over ×{small.scale}): "
            f"{fmt_n(marginal)} tokens/s, {100 * marginal / r.tiktoken_tokens_per_s:.0f}% of "
            f"tiktoken; cost of a run beyond that rate (start-up, last batches, manifest): "
            f"{fixed:.2f} s at ×{small.scale}.",
        ]
    large = r.sizes[-1]
    if len(r.sizes) > 1:
        lines += ["", _memory_growth(r.sizes[0], large)]
    if large.main_cpu_s > 0:
        lines += [
            "",
            f"The main process (reading documents through `datasets`, sending them to the "
            f"workers, receiving their tokens, writing shards) used {large.main_cpu_s:.2f} CPU s "
            f"for {large.tokens:,} tokens, {large.main_cpu_s / large.worker_cpu_s:.0%} of the "
            f"workers' CPU time: however many workers, one main process on this CPU caps the "
            f"stage at about {fmt_n(large.tokens / large.main_cpu_s)} tokens/s.",
        ]
    return "\n".join(lines)


def _memory_growth(small: PrepareRun, large: PrepareRun) -> str:
    """How the peaks changed from the smallest to the largest input, per million tokens."""
    millions = (large.tokens - small.tokens) / 1e6
    main = large.main_peak_rss - small.main_peak_rss
    worker = large.worker_peak_rss - small.worker_peak_rss
    return (
        f"Memory from ×{small.scale} to ×{large.scale}: main peak {main / MIB:+,.0f} MiB "
        f"({main / MIB / millions:+.1f} MiB per million more tokens), largest worker peak "
        f"{worker / MIB:+,.0f} MiB ({worker / MIB / millions:+.1f} MiB per million)."
    )
