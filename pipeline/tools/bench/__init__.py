"""`python -m pipeline.bench`: measured throughput of every stage, written to BENCHMARKS.md.

    python -m pipeline.bench                             # prepare, loader, train (minutes)
    python -m pipeline.bench --only prepare,loader --out /tmp/bench.md
    python -m pipeline.bench --model gpt2 --block-size 1024 --peak-flops 989e12   # on a GPU
    python -m pipeline.bench --quick                     # smoke run: 300 documents, few steps

- prepare: tokens/s of `pipeline.prepare.prepare` on the FineWeb sample (one worker process per
  core) against tiktoken `encode_ordinary_batch` on the same documents with as many threads, in
  interleaved rounds; and the peak memory of prepare in a fresh process at three input sizes.
- loader: batches/s of `TrainLoader.next_batch` against the batches/s a training step consumes.
- train: step time, tokens/s, MFU and peak memory of `pipeline.train.train`, torch.compile off
  and on, each in a fresh process.
- loss: peak memory and step time of real training steps with the output layer and
  cross-entropy computed in chunks (runtime.loss_impl=chunked, the default) against the full
  (B, T, V) logits (full): the tiny model at 16 x 256 and GPT-2 124M at 4 x 1024.
- memory: peak training memory of GPT-2 124M and 350M per micro-batch size, and the largest
  micro-batch that fits on an 80 GB GPU (measured on CUDA; the analytic estimate without it).

The data come from $FINEWEB_SAMPLE and $TIKTOKEN_CACHE_DIR, by default under $SHARED_DATA or
`../shared/data` beside the repository (as in tests/conftest.py). The output file keeps one
section per device: a run replaces the section of its own device and keeps the others. Nothing
runs at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import (
    COMPILE_MODES,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    OptimConfig,
    PrepareConfig,
    RuntimeConfig,
    SourceConfig,
    TrainConfig,
    TrainerConfig,
)
from pipeline.data.loader import TrainLoader
from pipeline.data.shards import MANIFEST, open_split
from pipeline.data.tokenizer import get_encoding, resolve_num_workers
from pipeline.data.writer import prepare
from pipeline.model import GPT, PRESETS, ModelConfig
from pipeline.tools.plan import (
    GIB,
    count_params,
    cuda_step_fits,
    estimate_memory,
    find_max_micro_batch,
    largest_power_of_two_fitting,
)

REPO = Path(__file__).resolve().parents[1]
BENCHES = ("prepare", "loader", "train", "loss", "memory")
SHARD_SIZE = 1_000_000
"""Tokens per shard, as the demo prepares the sample (Makefile DEMO_PREPARE)."""
VAL_TOKENS = 250_000
"""Validation split of the demo; a tenth of the tokens for smaller inputs."""
ROW_GROUP_ROWS = 512
"""Rows per parquet row group of the written inputs, the layout of the FineWeb sample file."""
GPU_TOKENS_PER_S = 500_000
"""Training throughput targeted for the 124M model on one H100 (tokens/s): a target, not a
measurement, used to derive the batches/s the loader must supply on such a GPU."""
LOADER_SHAPES = ((16, 1024), (16, 256))
"""(micro_batch_size, block_size) read by the loader benchmark: GPT-2's and the tiny model's."""
CHILD_CODE = "import sys; from pipeline.tools.bench import child_main; child_main(*sys.argv[1:])"
RESULT_MARK = "bench-result: "
MIB = 1 << 20


LOSS_CASES = (("tiny", 16, 256, 2, 8), ("gpt2", 4, 1024, 1, 1))
"""(model, micro_batch_size, block_size, warm-up steps, measured steps) of the loss benchmark:
the tiny model at 16 x 256 (the demo's batch until it moved to 8 x 256) and GPT-2 124M at
4 x 1024."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    max_documents: int | None = None
    """Documents of the sample to use (None = all 3,100)."""
    rounds: int = 5
    """Interleaved prepare/tiktoken rounds; loader timing rounds."""
    scales: tuple[int, ...] = (1, 4, 16)
    """Input sizes of the memory measurement, in copies of the documents."""
    loader_seconds: float = 1.0
    """Minimum seconds of next_batch calls per loader round."""
    warmup_steps: int = 2
    """Training steps left out of the step-time median (compilation, allocator warm-up)."""
    train_steps: int = 8
    """Training steps measured after the warm-up, per run."""
    train_repeats: int = 2
    """Training runs per torch.compile setting, the settings alternating."""
    compile_modes: tuple[bool, ...] = (False, True)
    """torch.compile settings to train with."""
    loss_cases: tuple = LOSS_CASES
    """(model, micro_batch_size, block_size, warm-up, measured steps) of the loss benchmark."""


FULL = Settings()
QUICK = Settings(
    max_documents=300,
    rounds=1,
    scales=(1, 2),
    loader_seconds=0.25,
    warmup_steps=1,
    train_steps=2,
    train_repeats=1,
    compile_modes=(False,),
    loss_cases=(("tiny", 4, 256, 1, 1),),
)


# --------------------------------------------------------------------------- environment


def shared_data() -> Path:
    """$SHARED_DATA, else `../shared/data` beside the repository."""
    return Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def fineweb_sample() -> Path:
    """$FINEWEB_SAMPLE, else the FineWeb sample parquet file of the shared data."""
    default = shared_data() / "fineweb" / "fineweb_sample.parquet"
    return Path(os.environ.get("FINEWEB_SAMPLE", default)).resolve()


def set_data_environment() -> None:
    """Point tiktoken at the shared cache and keep `datasets` offline, unless already set."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_data() / "tiktoken_cache"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Device:
    """The machine measured: its section key in the output file and its description."""

    key: str
    title: str
    cpu: str
    cores: int
    gpu: str | None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_device() -> Device:
    """This machine: the GPU when CUDA is available, else the CPU and its usable cores."""
    cpu, cores = cpu_model(), resolve_num_workers(0)
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        return Device(f"gpu: {gpu}", f"GPU: {gpu}", cpu, cores, gpu)
    name = f"{cpu}, {cores} cores"
    return Device(f"cpu: {name}", f"CPU: {name}", cpu, cores, None)


def versions() -> dict[str, str]:
    """Versions of python and the packages the stages time."""
    out = {"python": platform.python_version()}
    for package in ("torch", "tiktoken", "numpy", "datasets", "accelerate"):
        out[package] = importlib.metadata.version(package)
    return out


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (0s where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def maxrss_bytes(who: int) -> int:
    """getrusage(who).ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(who).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def _proc_status_bytes(field_name: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes; None where there is no /proc."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        lines = Path("/proc/self/status").read_text().splitlines()
        line = next(ln for ln in lines if ln.startswith(field_name + ":"))
        return int(line.split()[1]) * 1024
    return None


def peak_rss_self() -> int:
    """Peak resident memory of this process's own address space in bytes: VmHWM on Linux.

    Not getrusage(RUSAGE_SELF).ru_maxrss: across fork + exec Linux carries the launching
    process's peak into it, so a fresh `python` started by a 2 GB process reports >= 2 GB.
    Elsewhere that ru_maxrss is the fallback."""
    return _proc_status_bytes("VmHWM") or maxrss_bytes(resource.RUSAGE_SELF)


def rss_self() -> int | None:
    """Current resident memory of this process in bytes (VmRSS), None where unknown."""
    return _proc_status_bytes("VmRSS")


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of getrusage(who)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- child processes


def run_child(task: str, params: dict[str, Any], env: dict[str, str] | None = None) -> dict:
    """Run child_main(task, params) in a fresh python process (cwd: the repository) and return
    the dict it reports. Raises RuntimeError with the end of its output when it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CODE, task, json.dumps(params)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"benchmark child '{task}' failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def child_main(task: str, params_json: str) -> None:
    """Entry point of a child process: run one task and print its result as one JSON line."""
    tasks = {"prepare": _prepare_child, "train": _train_child}
    result = tasks[task](json.loads(params_json))
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- prepare


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


def _prepare_child(params: dict[str, Any]) -> dict[str, Any]:
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
    result = run_child("prepare", params)
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
        calls = [(tiktoken, partial(tiktoken_tokens, docs, workers)),
                 (prepared, partial(quiet_prepare, cfg))]  # fmt: skip
        for timings, call in calls if r % 2 == 0 else calls[::-1]:
            with timed(timings):
                call()
        if r:  # only the last round's shards are kept
            shutil.rmtree(work / f"round{r - 1}")
        print(f"prepare round {r + 1}/{rounds}: tiktoken {tiktoken[-1].wall_s:.2f} s, "
              f"prepare {prepared[-1].wall_s:.2f} s", flush=True)  # fmt: skip
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
        print(f"prepare x{scale}: {run.seconds:.2f} s, peak RSS main "
              f"{run.main_peak_rss / MIB:.0f} MiB, worker {run.worker_peak_rss / MIB:.0f} MiB",
              flush=True)  # fmt: skip
        sizes.append(run)
    return PrepareResult(
        len(docs), tokens, workers, str(source), tiktoken, prepared, sizes, str(out)
    )


# --------------------------------------------------------------------------- loader


@dataclass
class LoaderRate:
    """next_batch throughput for one (micro_batch_size, block_size)."""

    micro_batch_size: int
    block_size: int
    device: str
    rounds_batches_per_s: list[float]

    @property
    def batches_per_s(self) -> float:
        return statistics.median(self.rounds_batches_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.batches_per_s * self.micro_batch_size * self.block_size


def time_next_batch(loader: TrainLoader, seconds: float, warmup: int = 5) -> float:
    """Batches/s of loader.next_batch() over at least `seconds` after `warmup` batches."""
    for _ in range(warmup):
        loader.next_batch()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        count += 1
    if loader.device.type == "cuda":  # copies to the GPU are asynchronous
        torch.cuda.synchronize(loader.device)
    return count / (time.perf_counter() - start)


def bench_loader(
    shard_dir: Path,
    shapes: tuple[tuple[int, int], ...] = LOADER_SHAPES,
    rounds: int = 3,
    seconds: float = 1.0,
) -> list[LoaderRate]:
    """next_batch batches/s for each (micro_batch_size, block_size) over the train split,
    on the device training uses (cuda if available), rounds of at least `seconds` each."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split = open_split(shard_dir, "train", PRESETS["gpt2"].vocab_size)
    rates = []
    for b, t in shapes:
        loader = TrainLoader(split, t, b, device=device, vocab_size=PRESETS["gpt2"].vocab_size)
        measured = [time_next_batch(loader, seconds) for _ in range(rounds)]
        rates.append(LoaderRate(b, t, device, measured))
        print(f"loader {b} x {t}: {statistics.median(measured):,.0f} batches/s", flush=True)
    return rates


# --------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """Short pipeline.train.train runs of one setting, each in a fresh process. Times in
    seconds, memory in bytes."""

    model: str
    params: int
    flops_per_token: int
    micro_batch_size: int
    block_size: int
    compile: bool
    device: str
    precision: str
    warmup_steps: int
    step_times_s: list[list[float]]
    """Per run: step_time_s of every step, from metrics.jsonl, in step order."""
    mfu_values: list[list[float | None]]
    """Per run: mfu of every step (None without a known peak)."""
    peak_rss: int
    """Largest peak RSS of the training processes (`peak_rss_self`)."""
    cuda_peak: int | None
    """Largest torch.cuda.max_memory_allocated (None on CPU)."""
    wall_s: float
    """Wall time of the train() calls (set-up, steps, final checkpoint), summed."""
    compile_mode: str = "default"
    """torch.compile's mode when compiled."""
    loss_impl: str = "chunked"
    """runtime.loss_impl of the runs."""

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.block_size

    @property
    def measured_s(self) -> list[float]:
        """Step times after each run's warm-up steps."""
        return [t for run in self.step_times_s for t in run[self.warmup_steps :]]

    @property
    def step_time_s(self) -> float:
        """Median step time after the warm-up steps, over all runs."""
        return statistics.median(self.measured_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float | None:
        values = [m for run in self.mfu_values for m in run[self.warmup_steps :] if m is not None]
        return statistics.median(values) if values else None

    @property
    def first_step_s(self) -> float:
        """Median over runs of the first step's time."""
        return statistics.median(run[0] for run in self.step_times_s)

    @property
    def warmup_overhead_s(self) -> float:
        """Median over runs of the warm-up steps' time beyond as many steady-state steps:
        compilation when compiled."""
        w, steady = self.warmup_steps, self.step_time_s
        return statistics.median(sum(run[:w]) - len(run[:w]) * steady for run in self.step_times_s)


def pool_runs(runs: list[TrainResult]) -> TrainResult:
    """Runs of one setting as one TrainResult: steps pooled, the largest memory peaks."""
    cuda = [r.cuda_peak for r in runs if r.cuda_peak is not None]
    return replace(
        runs[0],
        step_times_s=[t for r in runs for t in r.step_times_s],
        mfu_values=[m for r in runs for m in r.mfu_values],
        peak_rss=max(r.peak_rss for r in runs),
        cuda_peak=max(cuda) if cuda else None,
        wall_s=sum(r.wall_s for r in runs),
    )


def train_config(params: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a benchmark run: grad_accum_steps 1, no validation, no samples, a
    checkpoint only at the end, metrics every step."""
    b, t = params["micro_batch_size"], params["block_size"]
    return TrainConfig(
        model=replace(PRESETS[params["model"]]),
        data=DataConfig(shard_dir=params["shard_dir"], block_size=t),
        optim=OptimConfig(warmup_steps=1),
        trainer=TrainerConfig(
            run_name="bench",
            runs_dir=params["runs_dir"],
            tokens_per_step=b * t,
            micro_batch_size=b,
            max_steps=params["steps"],
            log_interval=1,
        ),
        eval=EvalConfig(tokens=0, sample_tokens=0),
        checkpoint=CheckpointConfig(interval=0, resume="never"),
        runtime=RuntimeConfig(
            compile=params["compile"],
            compile_mode=params["compile_mode"],
            peak_flops=params["peak_flops"],
            loss_impl=params.get("loss_impl", "chunked"),
        ),
    )


def _train_child(params: dict[str, Any]) -> dict[str, Any]:
    # Imported here: the prepare child's memory should hold only what prepare imports.
    from accelerate.state import AcceleratorState

    from pipeline.training.loop import train

    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(train_config(params))
    return {
        "wall_s": time.perf_counter() - start,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": {"no": "fp32"}.get(mp := str(AcceleratorState().mixed_precision), mp),
        "peak_rss": peak_rss_self(),
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
    }


def read_train_records(metrics: Path) -> list[dict[str, Any]]:
    """The "train" records of a metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])


def train_in_child(params: dict[str, Any], work: Path, warmup_steps: int) -> TrainResult:
    """Train in a fresh process (with its own empty torch.compile cache, so compilation is
    timed cold) and read its metrics.jsonl."""
    runs = work / f"train_{'compiled' if params['compile'] else 'eager'}_{params['model']}"
    cache = {
        "TORCHINDUCTOR_CACHE_DIR": str(runs / "inductor_cache"),
        "TRITON_CACHE_DIR": str(runs / "triton_cache"),
    }
    child = run_child("train", {**params, "runs_dir": str(runs)}, env=cache)
    records = read_train_records(runs / "bench" / "metrics.jsonl")
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        model = GPT(PRESETS[params["model"]])
    shutil.rmtree(runs, ignore_errors=True)
    return TrainResult(
        model=params["model"],
        params=model.num_params(),
        flops_per_token=model.flops_per_token(params["block_size"]),
        micro_batch_size=params["micro_batch_size"],
        block_size=params["block_size"],
        compile=params["compile"],
        compile_mode=params["compile_mode"],
        loss_impl=params.get("loss_impl", "chunked"),
        precision=child.pop("precision"),
        warmup_steps=warmup_steps,
        step_times_s=[[r["step_time_s"] for r in records]],
        mfu_values=[[r.get("mfu") for r in records]],
        **child,
    )


def bench_train(
    shard_dir: Path,
    work: Path,
    model: str = "tiny",
    micro_batch_size: int = 16,
    block_size: int = 256,
    warmup_steps: int = 2,
    steps: int = 8,
    compile_modes: tuple[bool, ...] = (False, True),
    peak_flops: float | None = None,
    repeats: int = 1,
    compile_mode: str = "default",
) -> list[TrainResult]:
    """One TrainResult per torch.compile setting: `repeats` runs of each, the settings
    alternating, of warmup_steps + steps optimizer steps of micro_batch_size x block_size
    tokens each (one micro-batch per step); compiled runs use compile_mode."""
    runs: dict[bool, list[TrainResult]] = {mode: [] for mode in compile_modes}
    for compile_model in [mode for _ in range(repeats) for mode in compile_modes]:
        params = {
            "model": model,
            "shard_dir": str(shard_dir),
            "micro_batch_size": micro_batch_size,
            "block_size": block_size,
            "steps": warmup_steps + steps,
            "compile": compile_model,
            "compile_mode": compile_mode,
            "peak_flops": peak_flops,
        }
        result = train_in_child(params, work, warmup_steps)
        print(f"train compile={compile_model}: {result.step_time_s:.3f} s/step, "
              f"{result.tokens_per_s:,.0f} tokens/s", flush=True)  # fmt: skip
        runs[compile_model].append(result)
    return [pool_runs(r) for r in runs.values()]


# --------------------------------------------------------------------------- loss


def bench_loss(
    shard_dir: Path, work: Path, cases=LOSS_CASES, repeats: int = 2
) -> list[tuple[TrainResult, TrainResult]]:
    """For each case, (full, chunked): `repeats` fresh training processes per loss_impl, the
    two alternating, compile off, fp32 on CPU (bf16 on CUDA), no validation."""
    out = []
    for model, b, t, warmup, steps in cases:
        runs: dict[str, list[TrainResult]] = {"full": [], "chunked": []}
        for impl in [i for _ in range(repeats) for i in runs]:
            params = {"model": model, "shard_dir": str(shard_dir), "micro_batch_size": b,
                      "block_size": t, "steps": warmup + steps, "compile": False,
                      "compile_mode": "default", "peak_flops": None, "loss_impl": impl}  # fmt: skip
            result = train_in_child(params, work, warmup)
            print(f"loss {model} {b}x{t} {impl}: {result.step_time_s:.3f} s/step, peak "
                  f"{_mib(result.cuda_peak or result.peak_rss)}", flush=True)  # fmt: skip
            runs[impl].append(result)
        out.append((pool_runs(runs["full"]), pool_runs(runs["chunked"])))
    return out


def render_loss(pairs: list[tuple[TrainResult, TrainResult]]) -> str:
    """The loss section: one row per model and loss_impl, with the change against full."""
    rows = []
    for full, chunked in pairs:
        peak = {r.loss_impl: r.cuda_peak or r.peak_rss for r in (full, chunked)}
        for r in (full, chunked):
            change = "" if r is full else (
                f"memory {100 * (peak['chunked'] / peak['full'] - 1):+.0f}%, step time "
                f"{100 * (chunked.step_time_s / full.step_time_s - 1):+.1f}%"
            )  # fmt: skip
            rows.append([f"{r.model} ({r.params:,})", f"{r.micro_batch_size} × {r.block_size}",
                         f"`{r.loss_impl}`", _s(r.step_time_s), str(len(r.measured_s)),
                         _mib(peak[r.loss_impl]), change])  # fmt: skip
    cuda = pairs[0][0].cuda_peak is not None
    memory = "`torch.cuda.max_memory_allocated`" if cuda else "the process's peak RSS (VmHWM)"
    return "\n".join([
        "### loss: the output layer without (B, T, V) logits",
        "",
        "`pipeline.train.train` in a fresh process per run, `runtime.loss_impl=full` (the "
        "(B, T, V) logits, their float32 copy and gradient, as nanoGPT) and `chunked` (the "
        "default: 256 positions at a time, gradients computed in the forward; "
        "`pipeline.model.chunked_cross_entropy`), the two alternating; precision "
        f"{pairs[0][0].precision}, compile off, no validation. Step time: median of "
        f"`step_time_s` after the warm-up steps; peak memory: {memory} of the run, which "
        "includes the model, the optimizer states and, on CPU, the interpreter.",
        "",
        table(["model", "micro-batch", "loss_impl", "step time s", "steps", "peak memory",
               "chunked vs full"], rows),
    ])  # fmt: skip


# --------------------------------------------------------------------------- memory


MEMORY_MODELS = ("gpt2", "gpt2_medium")
"""GPT-2 124M and 350M: peak training memory per micro-batch size."""
MEMORY_CAP_BYTES = 79 * GIB
"""An 80 GB GPU: the 79 GiB that an H100 or A100 80GB leaves to CUDA. On a larger GPU the
caching allocator is limited to this (`torch.cuda.set_per_process_memory_fraction`), so the
largest micro-batch is the one that fits on an 80 GB card."""
MEMORY_MAX_BATCH = 512


@dataclass
class MemoryResult:
    """Peak training memory of one model per micro-batch size (bytes), measured on CUDA or
    estimated (`pipeline.plan.estimate_memory`) without it, and the largest micro-batch
    within cap_bytes."""

    model: str
    params: int
    block_size: int
    peaks: dict[int, int]
    largest: int
    cap_bytes: int
    measured: bool


def bench_memory(
    block_size: int = 1024,
    models: tuple[str, ...] = MEMORY_MODELS,
    cap_bytes: int = MEMORY_CAP_BYTES,
    compile: bool = False,
) -> list[MemoryResult]:
    """On CUDA: real bf16 training steps (`pipeline.plan.cuda_step_fits`: the real AdamW, two
    steps of two micro-batches) at micro-batch sizes doubling from 1, then bisecting, up to the
    largest that fits within cap_bytes; peak = torch.cuda.max_memory_allocated. Without CUDA:
    the analytic estimate at powers of two up to the largest within cap_bytes."""
    results = []
    for name in models:
        cfg = PRESETS[name]
        if torch.cuda.is_available():
            peaks = _measured_peaks(cfg, block_size, cap_bytes, compile)
            measured, largest = True, max(peaks, default=0)
        else:
            largest = largest_power_of_two_fitting(cfg, block_size, cap_bytes)
            sizes = [2**k for k in range(largest.bit_length())]
            peaks = {b: estimate_memory(cfg, b, block_size)["total"] for b in sizes}
            measured = False
        results.append(
            MemoryResult(name, count_params(cfg), block_size, peaks, largest, cap_bytes, measured)
        )
        print(f"memory {name}: largest micro-batch {largest}", flush=True)
    return results


def _measured_peaks(
    cfg: ModelConfig, block_size: int, cap_bytes: int, compile: bool
) -> dict[int, int]:
    """{micro_batch_size: peak bytes} of every size tried that fit under the cap."""
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    peaks: dict[int, int] = {}
    try:
        find_max_micro_batch(
            lambda b: cuda_step_fits(cfg, b, block_size, "bf16", compile, device, peaks),
            high=MEMORY_MAX_BATCH,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return dict(sorted(peaks.items()))


# --------------------------------------------------------------------------- consumption


@dataclass(frozen=True)
class Consumer:
    """What a training step takes from the loader."""

    micro_batch_size: int
    block_size: int
    batches_per_s: float
    label: str


def consumers(trains: list[TrainResult]) -> list[Consumer]:
    """The GPU target (derived, not measured) and every measured training run: micro-batches
    per second a step consumes (grad_accum_steps / step time; 1 micro-batch per step here)."""
    b, t = LOADER_SHAPES[0]
    gpu = Consumer(
        b,
        t,
        GPU_TOKENS_PER_S / (b * t),
        f"124M on one H100 at ~{GPU_TOKENS_PER_S:,} tokens/s: derived from the target, "
        "not measured",
    )
    measured = [
        Consumer(
            r.micro_batch_size,
            r.block_size,
            1 / r.step_time_s,
            f"{r.model}, compile {'on' if r.compile else 'off'}, {r.device}: measured",
        )
        for r in trains
    ]
    return [gpu, *measured]


# --------------------------------------------------------------------------- markdown


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:,.1f}"


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MIB:,.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _timing_row(what: str, timings: list[Timing], tokens_per_s: float) -> list[str]:
    walls = [t.wall_s for t in timings]
    cores = statistics.median(t.cores for t in timings)
    return [what, ", ".join(map(_s, walls)), _s(statistics.median(walls)), f"{cores:.2f}",
            _n(tokens_per_s)]  # fmt: skip


def render_prepare(r: PrepareResult) -> str:
    """The prepare section: throughput against tiktoken, then memory at each input size."""
    w = r.workers
    rows = [
        _timing_row(f"tiktoken `encode_ordinary_batch`, {w} threads", r.tiktoken,
                    r.tiktoken_tokens_per_s),
        _timing_row(f"prepare stage, {w} worker processes", r.prepare, r.prepare_tokens_per_s),
        ["**prepare / tiktoken** (target ≥ 90%)", "", "", "", f"**{100 * r.ratio:.0f}%**"],
    ]  # fmt: skip
    text = [
        "### prepare: documents to shards",
        "",
        f"{r.documents:,} FineWeb sample documents, {r.tokens:,} tokens (document tokens plus "
        f"one EOT each). The prepare stage is `pipeline.prepare.prepare` on "
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
        [f"sample ×{s.scale}", f"{s.documents:,}", f"{s.tokens:,}", _s(s.seconds),
         _n(s.tokens_per_s), _mib(s.baseline_rss), _mib(s.main_peak_rss),
         _mib(s.worker_peak_rss), f"{s.main_cpu_s:.2f}", f"{s.worker_cpu_s:.2f}"]
        for s in r.sizes
    ]  # fmt: skip
    header = ["input", "documents", "tokens", "prepare s", "tokens/s", "main RSS before",
              "main peak RSS", f"largest of {r.workers} workers' peak RSS", "main CPU s",
              "workers CPU s"]  # fmt: skip
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
            f"{_n(marginal)} tokens/s, {100 * marginal / r.tiktoken_tokens_per_s:.0f}% of "
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
            f"stage at about {_n(large.tokens / large.main_cpu_s)} tokens/s.",
        ]
    return "\n".join(lines)


LOADER_COLUMNS = ["micro-batch B × T", "loader batches/s", "loader tokens/s", "consumer",
                  "consumer batches/s", "loader / consumer"]  # fmt: skip
TRAIN_COLUMNS = ["torch.compile", "step time s", "range s", "tokens/s", "MFU", "model GFLOP/s",
                 "first step s", "compile time s", "peak memory"]  # fmt: skip


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


def render_loader(rates: list[LoaderRate], trains: list[TrainResult], shard_dir: str) -> str:
    """The loader section: batches/s against what each training step consumes."""
    rows = []
    for rate in rates:
        shape = (rate.micro_batch_size, rate.block_size)
        matched = [c for c in consumers(trains) if (c.micro_batch_size, c.block_size) == shape]
        loader = [f"{shape[0]} × {shape[1]}", _n(rate.batches_per_s), _n(rate.tokens_per_s)]
        rows += [
            [*loader, c.label, _n(c.batches_per_s), f"{rate.batches_per_s / c.batches_per_s:,.0f}×"]
            for c in matched
        ] or [[*loader, "no training step measured at this size", "n/a", "n/a"]]
    _, tokens = manifest_totals(Path(shard_dir))
    device = rates[0].device if rates else "cpu"
    return "\n".join(
        [
            "### loader: batches from shards",
            "",
            f"`TrainLoader.next_batch()` on the train split of the shards prepared above "
            f"({tokens:,} tokens in all), device {device}, rank 0 of 1: 5 warm-up batches, then "
            f"batches for at least the set time; rounds: {len(rates[0].rounds_batches_per_s)}, "
            "median. A training step consumes grad_accum_steps micro-batches (1 in the measured "
            "runs below).",
            "",
            table(LOADER_COLUMNS, rows),
        ]
    )


def _train_row(r: TrainResult) -> list[str]:
    measured = r.measured_s
    memory = _mib(r.peak_rss) + " RSS"
    if r.cuda_peak is not None:
        memory = f"{_mib(r.cuda_peak)} CUDA ({memory})"
    return [
        "on" if r.compile else "off",
        _s(r.step_time_s),
        f"{_s(min(measured))}–{_s(max(measured))}",
        _n(r.tokens_per_s),
        "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%",
        _n(r.flops_per_token * r.tokens_per_s / 1e9),
        _s(r.first_step_s),
        _s(r.warmup_overhead_s) if r.compile else "n/a",
        memory,
    ]


def render_train(results: list[TrainResult], peak_flops: float | None) -> str:
    """The train section: one row per torch.compile setting."""
    r0 = results[0]
    memory = "`torch.cuda.max_memory_allocated` and " if r0.cuda_peak is not None else ""
    peak = f"peak {peak_flops:.3g} FLOP/s" if peak_flops else "the device's bf16 peak if known"
    return "\n".join(
        [
            "### train: optimizer steps",
            "",
            f"`pipeline.train.train` in a fresh process per row: model `{r0.model}` "
            f"({r0.params:,} parameters), micro_batch_size {r0.micro_batch_size} × block "
            f"{r0.block_size} = {r0.tokens_per_step:,} tokens per step (grad_accum_steps 1), "
            f"precision {r0.precision}, device {r0.device}, torch.compile mode "
            f"`{r0.compile_mode}` where on; no validation. Step time: median "
            f"(and range) of `step_time_s` in metrics.jsonl over {len(r0.measured_s)} steps: "
            f"{len(r0.step_times_s)} runs per setting, the settings alternating, each of "
            f"{r0.warmup_steps} warm-up steps (left out) and "
            f"{len(r0.measured_s) // len(r0.step_times_s)} measured steps. First step and "
            "compile time (the warm-up steps' time beyond as many steady-state steps, from an "
            "empty compile cache): medians over the runs. "
            f"MFU against {peak} (n/a without one); model GFLOP/s = "
            f"{r0.flops_per_token:,} FLOPs/token (6·N + 12·L·C·T) × tokens/s. Peak memory: "
            f"{memory}the training process's peak RSS (VmHWM).",
            "",
            table(TRAIN_COLUMNS, [_train_row(r) for r in results]),
        ]
    )


@dataclass
class RunInfo:
    """What the header of a device section records about the run."""

    command: str
    started: datetime.datetime
    seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    versions: dict[str, str] = field(default_factory=versions)


def render_section(device: Device, info: RunInfo, parts: list[str]) -> str:
    """A device section: marker, heading, run facts, then each benchmark's part."""
    load = ", ".join(
        f"{' '.join(f'{x:.2f}' for x in la)} {when}"
        for la, when in ((info.load_before, "before"), (info.load_after, "after"))
    )
    gpu = device.gpu or "none"
    facts = [
        f"- date: {info.started:%Y-%m-%d %H:%M %Z}",
        f"- device: {device.cpu} ({platform.machine()}), {device.cores} usable cores; GPU: {gpu}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in info.versions.items())}",
        f"- command: `{info.command}` ({info.seconds:,.0f} s)",
        f"- load average (1, 5, 15 min): {load}. The machine may be shared: figures vary "
        "between runs.",
    ]
    body = [f"## {device.title}", "", *facts, "", *("\n\n".join(parts).splitlines())]
    return f"<!-- bench:device {device.key} -->\n" + "\n".join(body) + "\n<!-- bench:end -->\n"


HEADER = """# Benchmarks

Measured throughput of each stage, written by `python -m pipeline.bench` (`make bench`), and the
optimizer comparison at tiny scale, written by `python -m pipeline.compare` (`make compare`).
There is one section per device and tool; a run replaces the section of its own device and
keeps the others.
"""
NO_GPU = """## GPU

No GPU was available for these measurements. Run `make bench` on a GPU machine to add its
section.
"""
SECTION = re.compile(r"<!-- bench:device (?P<key>.+?) -->\n.*?<!-- bench:end -->\n", re.DOTALL)


def merge_benchmarks(existing: str, key: str, section: str) -> str:
    """The output file with `section` in place of the section keyed `key` (appended when new),
    other device sections kept, and the no-GPU note while no GPU section exists."""
    sections = {m["key"]: m[0] for m in SECTION.finditer(existing)}
    sections[key] = section
    text = HEADER + "".join("\n" + s for s in sections.values())
    if not any(k.startswith("gpu:") for k in sections):
        text += "\n" + NO_GPU
    return text


def render_memory(results: list[MemoryResult]) -> str:
    """The memory section: peak GiB per micro-batch size for each model, and the largest
    micro-batch within the cap."""
    r0 = results[0]
    sizes = sorted({b for r in results for b in r.peaks})
    rows = [
        [str(b)] + [f"{r.peaks[b] / GIB:,.2f}" if b in r.peaks else "—" for r in results]
        for b in sizes
    ]
    header = ["micro_batch_size"] + [f"{r.model} ({r.params / 1e6:,.0f}M) GiB" for r in results]
    cap = f"{r0.cap_bytes / GIB:,.0f} GiB (an 80 GB GPU)"
    if r0.measured:
        how = (
            "Measured: `pipeline.plan.cuda_step_fits`, the real model and fused AdamW, bf16 "
            "autocast, torch.compile off, two optimizer steps of two micro-batches of block "
            f"{r0.block_size}; peak = `torch.cuda.max_memory_allocated` (the CUDA context, "
            "~0.5 GiB, comes on top). Sizes double from 1 until one does not fit, then "
            f"bisect; the caching allocator is limited to {cap}. "
            "— : not tried."
        )
    else:
        how = (
            "No CUDA device: these are the analytic estimates of `make memory` "
            "(`pipeline.plan.estimate_memory`, eager bf16, block "
            f"{r0.block_size}), not measurements, at powers of two within {cap}. Run `make "
            "bench` on a GPU for measured figures. — : beyond the cap."
        )
    largest = ", ".join(f"{r.model} {r.largest}" for r in results)
    return "\n".join(
        [
            "### memory: peak training memory per micro-batch",
            "",
            how,
            "",
            table(header, rows),
            "",
            f"Largest micro_batch_size within {cap}: {largest}.",
        ]
    )


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--only", default=",".join(BENCHES), help=f"comma-separated: {','.join(BENCHES)}"
    )
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to update")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="train preset")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="train sequences")
    parser.add_argument("--block-size", type=int, default=256, help="train tokens per sequence")
    parser.add_argument(
        "--compile", choices=["both", "off", "on"], help="torch.compile runs (both; --quick: off)"
    )
    parser.add_argument(
        "--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode"
    )
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU")
    parser.add_argument("--max-documents", type=int, help="documents of the sample (all)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """FULL or QUICK, with --compile and --max-documents applied. Raises SystemExit for a
    block size beyond the model's or sizes below 1."""
    if not 1 <= args.block_size <= PRESETS[args.model].block_size or args.micro_batch_size < 1:
        raise SystemExit(
            f"error: --block-size {args.block_size} must be between 1 and model "
            f"{args.model}'s block_size {PRESETS[args.model].block_size}, and "
            f"--micro-batch-size {args.micro_batch_size} >= 1"
        )
    settings = QUICK if args.quick else FULL
    if args.compile:
        modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
        settings = replace(settings, compile_modes=modes)
    if args.max_documents:
        settings = replace(settings, max_documents=args.max_documents)
    return settings


def selected(only: str) -> list[str]:
    """The benchmarks named in --only, in run order. Raises SystemExit for unknown names."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown or not names:
        raise SystemExit(f"error: --only {only!r}: choose from {', '.join(BENCHES)}")
    return [b for b in BENCHES if b in names]


def run_benchmarks(args: argparse.Namespace, settings: Settings, work: Path) -> list[str]:
    """Run the selected benchmarks; returns their markdown parts."""
    benches = selected(args.only)
    prep, shard_dir = None, None
    if "prepare" in benches:
        docs, source = documents_source(fineweb_sample(), settings.max_documents, work)
        prep = bench_prepare(docs, source, work, settings.rounds, settings.scales)
        shard_dir = Path(prep.shard_dir)
    elif {"loader", "train", "loss"} & set(benches):
        docs, source = documents_source(fineweb_sample(), settings.max_documents, work)
        shard_dir = make_shards(docs, source, work)
    shapes = tuple(dict.fromkeys([*LOADER_SHAPES, (args.micro_batch_size, args.block_size)]))
    rates = (
        bench_loader(shard_dir, shapes, settings.rounds, settings.loader_seconds)
        if "loader" in benches
        else []
    )
    trains = []
    if "train" in benches:
        trains = bench_train(
            shard_dir, work, args.model, args.micro_batch_size, args.block_size,
            settings.warmup_steps, settings.train_steps, settings.compile_modes, args.peak_flops,
            settings.train_repeats, args.compile_mode,
        )  # fmt: skip
    losses = bench_loss(shard_dir, work, settings.loss_cases, settings.train_repeats) if (
        "loss" in benches
    ) else []  # fmt: skip
    memory = bench_memory() if "memory" in benches else []
    parts = [render_prepare(prep)] if prep else []
    parts += [render_loader(rates, trains, str(shard_dir))] if rates else []
    parts += [render_train(trains, args.peak_flops)] if trains else []
    parts += [render_loss(losses)] if losses else []
    parts += [render_memory(memory)] if memory else []
    return parts


def make_shards(docs: list[str], source: Path, work: Path) -> Path:
    """Shards of docs from `source` (for --only without prepare), prepared once, untimed."""
    tokens = tiktoken_tokens(docs, resolve_num_workers(0))
    return quiet_prepare(prepare_config(source, work / "shards", tokens, 0))


def main(argv: list[str] | None = None) -> str:
    """Run the benchmarks, update --out and return the new device section."""
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    set_data_environment()
    device, started = describe_device(), datetime.datetime.now(datetime.timezone.utc)
    load_before, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        parts = run_benchmarks(args, settings, Path(tmp))
    given = sys.argv[1:] if argv is None else argv
    command = "python -m pipeline.bench" + "".join(f" {a}" for a in given)
    info = RunInfo(command, started, time.perf_counter() - start, load_before, load_average())
    section = render_section(device, info, parts)
    out = Path(args.out)
    existing = out.read_text() if out.is_file() else ""
    out.write_text(merge_benchmarks(existing, device.key, section))
    print(section)
    print(f"wrote {out}")
    return section
