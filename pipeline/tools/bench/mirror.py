"""The mirror benchmark: what `checkpoint.mirror` costs the training loop at the demo's size.

The demo's run (conf/experiment/demo.yaml: the tiny model, Muon + AdamW, 2,048-token steps) on
the prepared sample, `pipeline.training.loop.train` in a fresh process, with a checkpoint every
`interval` steps, once without a mirror and once mirroring to a local folder (the same code path
as s3:// or gs://; the network's speed is not measured here). Blocked: the seconds the training
thread spends in Mirror.submit per completed checkpoint (the upload itself runs on the mirror's
thread), against the median step time of the run (metrics.jsonl step_time_s); upload: seconds
of each background update (Mirror.sync); the end of the run waits for the last one (Mirror.close).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.tools.render import fmt_s, table

MIRROR_CASE = (60, 5)
"""(steps, checkpoint interval) of each run."""


@dataclass
class MirrorResult:
    steps: int
    interval: int
    step_s: dict[str, float]
    """Median step time (seconds), by "no mirror" and "mirror"."""
    blocked_s: list[float]
    """Seconds the training thread spent in Mirror.submit: at start-up (after the pull) and
    per checkpoint."""
    upload_s: list[float]
    """Seconds of each background update (Mirror.sync)."""
    close_s: float
    """Seconds the end of the run waited for the last upload."""
    checkpoint_bytes: int

    @property
    def blocked_share(self) -> float:
        """Median blocked seconds per mirrored save over the median step time with the mirror."""
        return statistics.median(self.blocked_s) / self.step_s["mirror"]


def mirror_child(params: dict) -> dict:
    """In a fresh process: train the demo run (params: shard_dir, runs_dir, steps, interval,
    mirror: a URL or None); returns step times and the mirror's timings."""
    from pipeline.config.cli import compose_train
    from pipeline.training.checkpoint import mirror as mirror_module
    from pipeline.training.loop import train
    from pipeline.training.runlog import read_records

    timings: dict[str, list[float]] = {"submit": [], "sync": [], "close": []}

    def timed(name: str, method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                timings[name].append(time.perf_counter() - start)

        return wrapper

    for name in timings:  # the real methods, timed
        setattr(mirror_module.Mirror, name, timed(name, getattr(mirror_module.Mirror, name)))
    overrides = [
        "experiment=demo",
        f"data.shard_dir={params['shard_dir']}",
        f"trainer.runs_dir={params['runs_dir']}",
        f"trainer.max_steps={params['steps']}",
        f"checkpoint.interval={params['interval']}",
        "checkpoint.keep_last=2",
        "eval.tokens=0",
        "eval.sample_tokens=0",
        "trainer.log_interval=1",
    ]
    if params["mirror"]:
        overrides.append(f"checkpoint.mirror={params['mirror']}")
    train(compose_train(overrides))
    run_dir = Path(params["runs_dir"]) / "demo"
    steps = [r["step_time_s"] for r in read_records(run_dir, "train")][2:]  # after warm-up
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return {
        "step_s": statistics.median(steps),
        **timings,
        "checkpoint_bytes": sum(f.stat().st_size for f in newest.iterdir()),
    }


def bench_mirror(shard_dir: Path, work: Path, case=MIRROR_CASE) -> MirrorResult:
    """Both runs, each in a fresh process."""
    from pipeline.tools.bench.child import run_child

    steps, interval = case
    runs = {}
    for name, mirror in (("no mirror", None), ("mirror", str(work / "mirror"))):
        runs[name] = run_child(
            mirror_child,
            {
                "shard_dir": str(shard_dir),
                "steps": steps,
                "runs_dir": str(work / f"runs-{name.replace(' ', '-')}"),
                "interval": interval,
                "mirror": mirror,
            },
        )
    mirrored = runs["mirror"]
    result = MirrorResult(
        steps,
        interval,
        {k: r["step_s"] for k, r in runs.items()},
        mirrored["submit"],
        mirrored["sync"],
        sum(mirrored["close"]),
        mirrored["checkpoint_bytes"],
    )
    print(
        f"mirror: blocked {statistics.median(result.blocked_s) * 1e3:.3f} ms per save, "
        f"{result.blocked_share:.3%} of a step",
        flush=True,
    )
    return result


def render_mirror(r: MirrorResult) -> str:
    blocked = statistics.median(r.blocked_s)
    return "\n".join(
        [
            "### mirror: what checkpoint.mirror costs the training loop (the demo's size)",
            "",
            f"The demo run (tiny model, Muon + AdamW, 2,048-token steps), {r.steps} steps with a "
            f"checkpoint every {r.interval} ({r.checkpoint_bytes / 1e6:.1f} MB each, 2 kept), in "
            "fresh processes, without a mirror and mirroring to a local folder (the code path of "
            "s3:// and gs://; the network's speed is not measured). Blocked: seconds the training "
            "thread spends handing a complete checkpoint to the mirror (the upload runs on the "
            "mirror's own thread). Target (issue 25): under 1% of a step.",
            "",
            table(
                [
                    "hand-overs (start, each checkpoint)",
                    "blocked per hand-over (median / max)",
                    "share of a step",
                    "step s: no mirror / mirror",
                    "upload s per update (median)",
                    "end-of-run wait s",
                ],
                [
                    [
                        str(len(r.blocked_s)),
                        f"{blocked * 1e3:.3f} / {max(r.blocked_s) * 1e3:.3f} ms",
                        f"{r.blocked_share:.4%}",
                        f"{fmt_s(r.step_s['no mirror'])} / {fmt_s(r.step_s['mirror'])}",
                        fmt_s(statistics.median(r.upload_s)) if r.upload_s else "n/a",
                        fmt_s(r.close_s),
                    ]
                ],
            ),
        ]
    )
