"""`python -m pipeline.compare` (`make compare`): tune AdamW and Muon at tiny scale with Hydra
sweeps of pipeline.train, then compare the best of each at an equal token budget.

Every job is `experiment=compare_tiny` (the tiny GPT-2 on the FineWeb sample, 120 steps x
4,096 tokens, WSD schedule) and the score of a setting is its final validation loss, the mean
of its seeds (conf/sweep/*.yaml: 2 seeds). Stages, each one sweep (`python -m pipeline.train
-m`), each using the best setting of the one before:

  adamw       optim=adamw, sweep=adamw_lr: AdamW's max_lr
  muon_lr     optim=muon at that max_lr, sweep=muon_lr: Muon's muon_lr
  muon_adamw  optim=muon at the best muon_lr, sweep=adamw_lr: the AdamW rate beside Muon (the
              embeddings, biases and LayerNorms), by default at 0.5x, 2x, 4x and 8x AdamW's best
              rate (--muon-adamw-lrs), the table adding muon_lr's best job at 1x
  timing      step time of the best AdamW and the best Muon setting, fresh processes in
              alternating order, no validation

A job already complete is not trained again (checkpoint.resume=auto), so a second run only redoes
the tables. Writes `<runs>/compare/compare.md`, the plot of validation loss against tokens of
the best setting of each optimizer (--png), and a section of BENCHMARKS.md (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from pipeline.errors import ArgumentParser
from pipeline.files import write_text_atomic
from pipeline.tools.host import describe_device, load_average
from pipeline.tools.plot import Curves, output_path, plot_runs, read_curves
from pipeline.tools.process import run_timed
from pipeline.tools.render import RunInfo, merge_benchmarks, render_section, table
from pipeline.training.runlog import read_records

SEEDS_KEY = "trainer.seed"


@dataclass
class Job:
    """One finished training run of a sweep."""

    path: Path
    optim: str
    max_lr: float
    muon_lr: float | None
    seed: int
    val_loss: float
    """Validation loss (nats/token) after the last step."""
    curves: Curves

    @property
    def setting(self) -> tuple:
        return (self.optim, self.max_lr, self.muon_lr)


@dataclass
class Setting:
    """The jobs of one setting (optimizer and rates) over its seeds."""

    jobs: list[Job]

    @property
    def key(self) -> tuple:
        return self.jobs[0].setting

    @property
    def mean(self) -> float:
        return statistics.fmean(j.val_loss for j in self.jobs)

    def label(self) -> str:
        j = self.jobs[0]
        muon = f", muon_lr {j.muon_lr:g}" if j.optim == "muon" else ""
        return f"{j.optim} (max_lr {j.max_lr:g}{muon})"

    def overrides(self) -> list[str]:
        j = self.jobs[0]
        out = [f"optim={j.optim}", f"optim.max_lr={j.max_lr}"]
        return out + ([f"optim.muon_lr={j.muon_lr}"] if j.optim == "muon" else [])


@dataclass
class Results:
    stages: dict[str, list[Setting]] = field(default_factory=dict)
    step_times: dict[str, list[float]] = field(default_factory=dict)
    bf16_slowdown: float | None = None
    """bf16 / fp32 matmul time on this CPU (None on CUDA)."""


# --------------------------------------------------------------------------- running jobs


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "experiment=compare_tiny", *overrides]


def run(cmd: list[str], log: Path) -> None:
    """Run cmd from the repository, its output appended to log. Raises RuntimeError with the
    log's end when it fails."""
    run_timed(cmd, log=log).check(f"{' '.join(cmd)} (log: {log})")


def read_job(run_dir: Path) -> Job:
    """A sweep job from its composed config (.hydra/config.yaml) and metrics.jsonl. Raises
    RuntimeError when it has not finished (no validation loss at its last step)."""
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    optim, trainer = cfg["optim"], cfg["trainer"]
    curves = read_curves(run_dir)
    end = trainer["max_steps"] * trainer["tokens_per_step"]
    if not curves.val or curves.val[-1][0] != end:
        raise RuntimeError(f"{run_dir} did not finish: no validation loss at {end:,} tokens")
    muon = optim["name"] == "muon"
    return Job(
        run_dir,
        optim["name"],
        optim["max_lr"],
        optim["muon_lr"] if muon else None,
        trainer["seed"],
        curves.val[-1][1],
        curves,
    )


def group(jobs: list[Job]) -> list[Setting]:
    """Jobs grouped by setting, in the order first seen."""
    settings: dict[tuple, list[Job]] = {}
    for job in jobs:
        settings.setdefault(job.setting, []).append(job)
    return [Setting(js) for js in settings.values()]


def sweep(runs_dir: Path, stage: str, overrides: list[str]) -> list[Setting]:
    """Run (or find finished) the sweep of one stage; its jobs are `<runs>/compare/<stage>/N`."""
    name = f"compare/{stage}"
    cmd = train_command([*overrides, f"trainer.runs_dir={runs_dir}", f"trainer.run_name={name}"])
    run(cmd, runs_dir / "compare" / "logs" / f"{stage}.log")
    jobs = sorted((runs_dir / name).glob("[0-9]*"), key=lambda p: int(p.name))
    return group([read_job(p) for p in jobs])


def best(settings: list[Setting]) -> Setting:
    return min(settings, key=lambda s: s.mean)


# --------------------------------------------------------------------------- step time


def step_times(
    setting: Setting, work: Path, steps: int, warmup: int, extra: list[str]
) -> list[float]:
    """step_time_s of `steps` steps after `warmup` left out, in a fresh training process
    without validation, samples or intermediate checkpoints."""
    name = f"time_{setting.jobs[0].optim}_{len(list(work.glob('time_*')))}"
    run(
        train_command(
            [
                *setting.overrides(),
                *extra,
                f"trainer.runs_dir={work}",
                f"trainer.run_name={name}",
                f"trainer.max_steps={warmup + steps}",
                "eval.tokens=0",
                "trainer.log_interval=1",
                "optim.warmup_steps=1",
                "checkpoint.resume=never",
            ]
        ),
        work / f"{name}.log",
    )
    return [r["step_time_s"] for r in read_records(work / name, "train")][warmup:]


def bf16_matmul_slowdown(rows: int = 384, cols: int = 128, repeats: int = 50) -> float:
    """How many times longer a bfloat16 Gram matrix X @ X.T of a (cols, rows) matrix takes than
    a float32 one on the CPU: the core of torch.optim.Muon's Newton-Schulz iteration, which runs
    in bfloat16 (default shape: the tiny model's c_attn, transposed as Muon does)."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(cols, rows, dtype=dtype)
        x @ x.T
        start = time.perf_counter()
        for _ in range(repeats):
            x @ x.T
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] / times[torch.float32]


# --------------------------------------------------------------------------- report


def _row(s: Setting, seeds: list[int], chosen: Setting) -> list[str]:
    j = s.jobs[0]
    by_seed = {job.seed: f"{job.val_loss:.4f}" for job in s.jobs}
    mean = f"{s.mean:.4f}"
    return [
        j.optim,
        f"{j.max_lr:g}",
        f"{j.muon_lr:g}" if j.muon_lr else "—",
        *(by_seed.get(seed, "—") for seed in seeds),
        f"**{mean}**" if s is chosen else mean,
    ]


def stage_table(settings: list[Setting]) -> str:
    seeds = sorted({j.seed for s in settings for j in s.jobs})
    chosen = best(settings)
    header = ["optim", "max_lr", "muon_lr", *(f"seed {s}" for s in seeds), "mean"]
    return table(header, [_row(s, seeds, chosen) for s in settings])


def render(results: Results, png: Path | None, budget: str) -> str:
    """The comparison as Markdown: each stage's table, the best of each optimizer and the step
    times."""
    st = results.stages
    adamw, muon = best(st["adamw"]), best(st["muon_lr"] + st.get("muon_adamw", []))
    gap = adamw.mean - muon.mean
    parts = [
        f"Each job: `experiment=compare_tiny` ({budget}); the score is the validation loss "
        "(nats/token) after the last step, mean of the seeds; bold: the stage's best.",
        "",
        table(
            ["recipe", "mean val loss", "seeds"],
            [
                [f"best AdamW: {adamw.label()}", f"{adamw.mean:.4f}", str(len(adamw.jobs))],
                [f"best Muon: {muon.label()}", f"{muon.mean:.4f}", str(len(muon.jobs))],
            ],
        ),
        "",
        f"Muon is **{gap:.3f} nats** below AdamW at equal tokens (target: at least 0.25).",
    ]
    if results.step_times:
        t = {k: statistics.median(v) for k, v in results.step_times.items()}
        over = 100 * (t["muon"] / t["adamw"] - 1)
        n = len(results.step_times["adamw"])
        parts += [
            "",
            f"Step time (median of {n} steps each, fresh processes in alternating "
            f"order, no validation): AdamW {t['adamw']:.3f} s, Muon {t['muon']:.3f} s, "
            f"**{over:+.1f}%** (target: at most +10%).",
        ]
        if results.bf16_slowdown is not None:
            parts[-1] += (
                " torch.optim.Muon runs its Newton–Schulz iteration in bfloat16; on this CPU a "
                f"bfloat16 matmul of the tiny model's q, k, v shape takes "
                f"{results.bf16_slowdown:.1f}x as long as a float32 one (no bf16 matrix "
                "units), which is most of Muon's extra time here. On GPUs with bf16 tensor "
                "cores modded-nanogpt measures < 2% wall-clock overhead."
            )
    for stage, title in (
        ("adamw", "AdamW's max_lr"),
        ("muon_lr", "Muon's muon_lr"),
        ("muon_adamw", "the AdamW rate beside Muon"),
    ):
        if stage in st:
            parts += ["", f"#### stage {stage}: {title}", "", stage_table(st[stage])]
    if png is not None:
        parts += ["", f"![validation loss against tokens]({png.name})"]
    return "\n".join(parts)


def section(body: str, info: RunInfo) -> tuple[str, str]:
    """compare's section of BENCHMARKS.md, keyed `compare/<device>`: its key and text."""
    device = describe_device()
    title = f"Optimizers at tiny scale: AdamW and Muon ({device.title})"
    device = dataclasses.replace(device, key=f"compare/{device.key}", title=title)
    return device.key, render_section(device, info, [body])


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs", help="where the sweeps' runs go (runs)")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to update ('' = none)")
    p.add_argument("--png", default="BENCHMARKS-optimizers.png", help="plot to write")
    p.add_argument("--timing-rounds", type=int, default=2, help="fresh processes per optimizer")
    p.add_argument("--timing-steps", type=int, default=8, help="steps timed per process")
    p.add_argument("--skip", default="", help="stages to leave out: timing")
    p.add_argument("--adamw-lrs", help="AdamW max_lr values, e.g. 3e-3,6e-3 (sweep adamw_lr's)")
    p.add_argument("--muon-lrs", help="Muon muon_lr values, e.g. 0.02,0.04 (sweep muon_lr's)")
    p.add_argument(
        "--muon-adamw-lrs",
        help="AdamW rates beside Muon for stage muon_adamw (default: 0.5x, 2x, 4x and 8x "
        "the best AdamW max_lr; muon_lr's best adds 1x)",
    )
    p.add_argument("--seeds", help="seeds, e.g. 1337,1338 (the sweeps')")
    p.add_argument("overrides", nargs="*", help="Hydra overrides added to every job")
    return p


def compare(args: argparse.Namespace) -> tuple[Results, str]:
    """Run every stage; returns the results and their Markdown."""
    if args.png:
        output_path(args.png)  # matplotlib there, a format it writes: before hours of sweeps
    runs, extra = Path(args.runs_dir).resolve(), list(args.overrides)
    skip = set(args.skip.split(","))
    seeds = [f"{SEEDS_KEY}={args.seeds}"] if args.seeds else []
    adamw_grid = ["sweep=adamw_lr", *([f"optim.max_lr={args.adamw_lrs}"] if args.adamw_lrs else [])]
    muon_grid = ["sweep=muon_lr", *([f"optim.muon_lr={args.muon_lrs}"] if args.muon_lrs else [])]
    results = Results()
    st = results.stages
    st["adamw"] = sweep(runs, "adamw", ["optim=adamw", *adamw_grid, *seeds, *extra])
    lr = best(st["adamw"]).jobs[0].max_lr
    st["muon_lr"] = sweep(
        runs, "muon_lr", ["optim=muon", f"optim.max_lr={lr}", *muon_grid, *seeds, *extra]
    )
    muon_1 = best(st["muon_lr"])
    beside = args.muon_adamw_lrs or ",".join(f"{k * lr:g}" for k in (0.5, 2, 4, 8))
    st["muon_adamw"] = [muon_1] + sweep(
        runs,
        "muon_adamw",
        [
            "optim=muon",
            f"optim.muon_lr={muon_1.jobs[0].muon_lr}",
            "sweep=adamw_lr",
            f"optim.max_lr={beside}",
            *seeds,
            *extra,
        ],
    )
    adamw, muon = best(st["adamw"]), best(st["muon_lr"] + st["muon_adamw"])
    if "timing" not in skip:
        with tempfile.TemporaryDirectory(prefix="compare-timing-") as tmp:
            results.step_times = {"adamw": [], "muon": []}
            if not torch.cuda.is_available():
                results.bf16_slowdown = bf16_matmul_slowdown()
            for _ in range(args.timing_rounds):
                for name, s in (("adamw", adamw), ("muon", muon)):
                    results.step_times[name] += step_times(
                        s, Path(tmp), args.timing_steps, 2, extra
                    )
    png = Path(args.png) if args.png else None
    if png is not None:
        curves = [
            Curves(f"{s.label()} seed {j.seed}", val=j.curves.val)
            for s in (adamw, muon)
            for j in s.jobs
        ]
        plot_runs(curves, png, "validation loss, best AdamW and best Muon (tiny model)")
    job0 = adamw.jobs[0]
    cfg = yaml.safe_load((job0.path / ".hydra" / "config.yaml").read_text())["trainer"]
    budget = (
        f"{cfg['max_steps']} steps x {cfg['tokens_per_step']:,} tokens = "
        f"{cfg['max_steps'] * cfg['tokens_per_step']:,} tokens"
    )
    return results, render(results, png, budget)


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    load, start = load_average(), time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    results, body = compare(args)
    out_md = Path(args.runs_dir).resolve() / "compare" / "compare.md"
    write_text_atomic(out_md, body + "\n")
    given = sys.argv[1:] if argv is None else argv
    command = "python -m pipeline.compare" + "".join(f" {a}" for a in given)
    if args.out:
        info = RunInfo(command, started, time.perf_counter() - start, load, load_average())
        key, text = section(body, info)
        out = Path(args.out)
        write_text_atomic(
            out, merge_benchmarks(out.read_text() if out.is_file() else "", key, text)
        )
    print(body)
    print(f"wrote {out_md}" + (f" and {args.out}" if args.out else ""))
    if args.png and Path(args.png).parent != out_md.parent:
        shutil.copy(args.png, out_md.parent / Path(args.png).name)
    return body
