"""Loss curves without W&B: `python -m pipeline.plot runs/NAME [runs/OTHER ...] --out loss.png`.

Reads each run's `metrics.jsonl` and draws training loss (thin) and validation loss (markers)
against tokens seen, one colour per run, into a PNG. A sweep folder (`runs/<sweep>/` holding
`0/`, `1/`, ...) stands for all of its runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ArgumentParser, DataError, OutputError
from pipeline.files import write_failed
from pipeline.training.runlog import METRICS, read_records


@dataclass
class Curves:
    """One run's losses (nats/token) against tokens seen."""

    name: str
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)


def expand_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path that holds metrics.jsonl, else its subfolders that do (a sweep).
    Raises DataError naming a path with neither."""
    runs = []
    for path in map(Path, paths):
        found = (
            [path]
            if (path / METRICS).is_file()
            else sorted(p.parent for p in path.glob(f"*/{METRICS}"))
        )
        if not found:
            raise DataError(f"{path}: no {METRICS} in it or its subfolders (a run folder?)")
        runs += found
    return runs


def read_curves(run_dir: Path, name: str | None = None) -> Curves:
    """Train and validation (tokens_seen, loss) points of a run, in logged order; skipped
    (non-finite) steps are left out."""
    curves = Curves(name or str(run_dir))
    for record in read_records(run_dir):
        if record["kind"] in ("train", "val"):
            getattr(curves, record["kind"]).append((record["tokens_seen"], record["loss"]))
    return curves


def require_matplotlib() -> None:
    """Raise OutputError saying how to install matplotlib (the `plot` extra) when it is not
    there: before a plot is asked of it, not after a run's hours of work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise OutputError(
            f"plots need matplotlib, which is not installed ({e}): pip install -e '.[plot]'"
        ) from None


def output_path(out: str | Path) -> Path:
    """The file the plot goes to: `out`, with `.png` added when it has no suffix (as matplotlib
    would add it). Raises OutputError for an existing folder or a format matplotlib cannot
    write."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: give a file name, e.g. {out / 'loss.png'}")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
        if out.is_dir():
            raise OutputError(f"--out {out} is a folder: give another file name")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise OutputError(
            f"--out {out}: matplotlib cannot write {out.suffix} files; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    return out


def plot_runs(runs: list[Curves], out: str | Path, title: str = "loss") -> Path:
    """Draw the runs' curves into an image at output_path(out) (PNG unless its suffix names
    another format; folders created); returns the path written. Raises OutputError."""
    out = output_path(out)  # first: it checks that matplotlib is there
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        if run.train:
            ax.plot(*zip(*run.train), color=colour, lw=1, alpha=0.6, label=f"{run.name} train")
        if run.val:
            ax.plot(*zip(*run.val), color=colour, marker="o", ms=4, label=f"{run.name} val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight")
    except OSError as e:
        raise write_failed(out, e, "nothing else was changed") from e
    finally:
        plt.close(fig)
    return out


def run_label(run_dir: Path) -> str:
    """`<sweep>/<job>` for a job of a Hydra sweep (its folder holds multirun.yaml), else the
    run folder's name."""
    if (run_dir.parent / "multirun.yaml").is_file():
        return f"{run_dir.parent.name}/{run_dir.name}"
    return run_dir.name


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m pipeline.plot", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders, or sweep folders holding runs")
    parser.add_argument(
        "--out",
        default="loss.png",
        help="image to write: PNG (default loss.png; .png is added to a name "
        "without suffix), or .svg, .pdf ... by its suffix",
    )
    parser.add_argument("--title", default="loss")
    args = parser.parse_args(argv)
    run_dirs = expand_runs(args.runs)
    names = [run_label(p) for p in run_dirs]
    out = plot_runs([read_curves(p, n) for p, n in zip(run_dirs, names)], args.out, args.title)
    print(f"wrote {out} ({len(run_dirs)} run(s))")
