"""`python -m pipeline.bench`: measured throughput of every stage, written to BENCHMARKS.md.

    python -m pipeline.bench                             # prepare, loader, train (minutes)
    python -m pipeline.bench --only prepare,loader --out /tmp/bench.md
    python -m pipeline.bench --model gpt2 --block-size 1024 --peak-flops 989e12   # on a GPU
    python -m pipeline.bench --quick                     # smoke run: 300 documents, few steps

- prepare: tokens/s of `pipeline.data.writer.prepare` on the FineWeb sample (one worker process
  per core) against tiktoken `encode_ordinary_batch` on the same documents with as many threads,
  in interleaved rounds; and the peak memory of prepare in a fresh process at three input sizes.
- loader: batches/s of `TrainLoader.next_batch` against the batches/s a training step consumes.
- train: step time, tokens/s, MFU and peak memory of `pipeline.training.loop.train`,
  torch.compile off and on, each in a fresh process.
- loss: peak memory and step time of real training steps with the output layer and
  cross-entropy computed in chunks (runtime.loss_impl=chunked, the default) against the full
  (B, T, V) logits (full): the tiny model at 16 x 256 and GPT-2 124M at 4 x 1024.
- memory: peak training memory of GPT-2 124M and 350M per micro-batch size, and the largest
  micro-batch that fits on an 80 GB GPU (measured on CUDA; the analytic estimate without it).
- sample: greedy generation of 256 tokens after a 32-token prompt by GPT-2 124M, with the KV
  cache and without it.
- compile: graphs, graph breaks, traced operations and compile time of GPT-2 124M's compiled
  training step with the loss chunks of a 64 x 1024 GPU run, before and after they were sized
  by the device's budget (minutes on a CPU; not in the default run).
- muon: torch.optim.Muon's step on GPT-2 124M's block matrices on one process against the same
  step split over two (ZeroRedundancyOptimizer over gloo, one thread each): time and memory per
  process, and whether the weights stay bit-identical (CPU processes; not in the default run).
- fsdp-memory: the peak memory of one of two processes running FSDP2 training steps (gloo, CPU),
  measured with torch's FSDPMemTracker, against the analytic estimate, for GPT-2 124M (fp32 and
  bf16) and 350M (minutes; not in the default run).
- checkpoint: seconds a save blocks training (format 1, the whole state written by rank 0,
  against DCP synchronous and asynchronous), total save time, resume time and peak memory per
  process on resume, for GPT-2 124M and 350M with AdamW and Muon on 1 and 2 processes (gloo,
  CPU; minutes; not in the default run).
- mirror: the seconds the training loop waits per checkpoint handed to checkpoint.mirror, against
  a step of the demo's run, with and without the mirror (a local folder; not in the default run).
- sweep: the wall time of a 4-job sweep of the demo's run with its jobs two at a time against
  one at a time (hydra/launcher=parallel), and each job's final loss either way (minutes; not in
  the default run).

The data come from $FINEWEB_SAMPLE and $TIKTOKEN_CACHE_DIR, by default under $SHARED_DATA or
`../shared/data` beside the repository (as in tests/conftest.py). The output file keeps one
section per device: a run of every benchmark replaces the section of its own device and keeps
the others; a run of some (--only) replaces only their parts of that section, each with a note
of its date, command and load. Nothing runs at import time.

One module per benchmark (prepare, loader, train, loss, memory, sample, compiling, muon,
fsdp_memory, checkpoint, mirror, sweep: each measures and renders its section) on `host` (the
machine), `child` (fresh processes) and `render` (BENCHMARKS.md); this one is the command line.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import COMPILE_MODES
from pipeline.errors import ArgumentParser, ConfigError
from pipeline.files import write_text_atomic
from pipeline.model import PRESETS
from pipeline.tools.bench.checkpoint import bench_checkpoint, render_checkpoint
from pipeline.tools.bench.compiling import bench_compile, render_compile
from pipeline.tools.bench.fsdp_memory import bench_fsdp_memory, render_fsdp_memory
from pipeline.tools.bench.loader import LOADER_SHAPES, bench_loader, render_loader
from pipeline.tools.bench.loss import LOSS_CASES, bench_loss, render_loss
from pipeline.tools.bench.memory import bench_memory, render_memory
from pipeline.tools.bench.mirror import bench_mirror, render_mirror
from pipeline.tools.bench.muon import bench_muon, render_muon
from pipeline.tools.bench.prepare import (
    bench_prepare,
    documents_source,
    make_shards,
    render_prepare,
)
from pipeline.tools.bench.sample import SAMPLE_CASE, bench_sample, render_sample
from pipeline.tools.bench.sweep import bench_sweep, render_sweep
from pipeline.tools.bench.train import bench_train, render_train
from pipeline.tools.host import (
    describe_device,
    fineweb_sample,
    load_average,
    set_data_environment,
)
from pipeline.tools.render import (
    RunInfo,
    device_section,
    merge_benchmarks,
    render_section,
    replace_parts,
    run_note,
)

BENCHES = (
    "prepare",
    "loader",
    "train",
    "loss",
    "memory",
    "sample",
    "compile",
    "muon",
    "fsdp-memory",
    "checkpoint",
    "mirror",
    "sweep",
)
DEFAULT = ("prepare", "loader", "train", "loss", "memory", "sample")
"""What `python -m pipeline.bench` runs without --only."""


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
    sample_case: tuple = SAMPLE_CASE
    """(model, prompt tokens, new tokens, timings per way) of the sampling benchmark."""


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
    sample_case=("tiny", 8, 16, 1),
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(DEFAULT), help=f"comma-separated: {','.join(BENCHES)}"
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
    """FULL or QUICK, with --compile and --max-documents applied. Raises ConfigError for a
    block size beyond the model's or sizes below 1."""
    if not 1 <= args.block_size <= PRESETS[args.model].block_size or args.micro_batch_size < 1:
        raise ConfigError(
            f"--block-size {args.block_size} must be between 1 and model "
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
    """The benchmarks named in --only, in run order. Raises ConfigError for unknown names."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown or not names:
        raise ConfigError(f"--only {only!r}: choose from {', '.join(BENCHES)}")
    return [b for b in BENCHES if b in names]


def run_benchmarks(args: argparse.Namespace, settings: Settings, work: Path) -> list[str]:
    """Run the selected benchmarks; returns their markdown parts."""
    benches = selected(args.only)
    prep, shard_dir = None, None
    if "prepare" in benches:
        docs, source = documents_source(fineweb_sample(), settings.max_documents, work)
        prep = bench_prepare(docs, source, work, settings.rounds, settings.scales)
        shard_dir = Path(prep.shard_dir)
    elif {"loader", "train", "loss", "mirror", "sweep"} & set(benches):
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
            shard_dir,
            work,
            args.model,
            args.micro_batch_size,
            args.block_size,
            settings.warmup_steps,
            settings.train_steps,
            settings.compile_modes,
            args.peak_flops,
            settings.train_repeats,
            args.compile_mode,
        )
    losses = (
        bench_loss(shard_dir, work, settings.loss_cases, settings.train_repeats)
        if ("loss" in benches)
        else []
    )
    memory = bench_memory() if "memory" in benches else []
    sampled = bench_sample(*settings.sample_case) if "sample" in benches else None
    compiled = bench_compile() if "compile" in benches else []
    muon = bench_muon() if "muon" in benches else []
    fsdp_memory = bench_fsdp_memory() if "fsdp-memory" in benches else []
    saves = bench_checkpoint() if "checkpoint" in benches else []
    mirrored = bench_mirror(shard_dir, work) if "mirror" in benches else None
    swept = bench_sweep(shard_dir, work) if "sweep" in benches else None
    parts = [render_prepare(prep)] if prep else []
    parts += [render_loader(rates, trains, str(shard_dir))] if rates else []
    parts += [render_train(trains, args.peak_flops)] if trains else []
    parts += [render_loss(losses)] if losses else []
    parts += [render_memory(memory)] if memory else []
    parts += [render_sample(sampled)] if sampled else []
    parts += [render_compile(compiled)] if compiled else []
    parts += [render_muon(muon)] if muon else []
    parts += [render_fsdp_memory(fsdp_memory)] if fsdp_memory else []
    parts += [render_checkpoint(saves)] if saves else []
    parts += [render_mirror(mirrored)] if mirrored else []
    parts += [render_sweep(swept)] if swept else []
    return parts


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
    out = Path(args.out)
    existing = out.read_text() if out.is_file() else ""
    old = device_section(existing, device.key)
    if old is None or set(selected(args.only)) >= set(DEFAULT):
        section = render_section(device, info, parts)
    else:  # some benchmarks: the other parts of the device section stay as they were
        section = replace_parts(old, parts, run_note(info))
    write_text_atomic(out, merge_benchmarks(existing, device.key, section))
    print(section)
    print(f"wrote {out}")
    return section
