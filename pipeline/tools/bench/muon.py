"""The Muon benchmark: torch.optim.Muon's step on one process against the same step split over
several (torch.distributed.optim.ZeroRedundancyOptimizer, as pipeline.training.optim builds it
for a data-parallel run).

Every process holds the block matrices of a GPT-2 preset (per layer: attn.c_attn (3C, C),
attn.c_proj (C, C), mlp.c_fc (4C, C), mlp.c_proj (C, 4C)), all seeded alike, and the same
gradients each step (as DDP leaves them). One process runs Muon on every matrix; each of `ranks`
processes, started by torch.distributed.run over gloo, one thread each, runs Newton–Schulz for
its share of the matrices and broadcasts the updated weights. Measured per process: the median
step time after one warm-up step (seconds), the optimizer state it holds (bytes: Muon's
momentum buffers), and its peak RSS (bytes: weights, gradients, state and the interpreter).
Afterwards each process repeats the steps with torch.optim.Muon on every matrix, from the same
start, and compares: the split run's weights must be bit-identical.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from pipeline.tools.render import fmt_mib, fmt_s, table

MUON_CASE = ("gpt2", 2, 6)
"""(model preset, processes of the split run, steps per run: 1 warm-up + the timed ones)."""


@dataclass
class MuonResult:
    processes: int
    step_s: float
    """Median optimizer step, slowest process (seconds)."""
    state_bytes: int
    """Muon state held by one process (the largest share)."""
    peak_rss: int
    """Peak RSS of one process (the largest)."""
    identical: bool
    """Weights bit-identical to torch.optim.Muon on every matrix."""
    matrices: list[int]
    """Matrices each process updates."""


def _matrices(model: str, seed: int) -> list:
    """The block matrices of a preset, float32, seeded (the same on every process)."""
    import torch

    from pipeline.model import PRESETS

    c, layers = PRESETS[model].n_embd, PRESETS[model].n_layer
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * layers
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _run(params: list, optimizer, steps: int, seed: int) -> list[float]:
    """`steps` optimizer steps with seeded gradients; returns each step's seconds."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    seconds = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def muon_child(params: dict) -> dict:
    """In one of params["processes"] fresh processes (torch.distributed.run sets RANK and
    WORLD_SIZE when there are several): see the module docstring."""
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from pipeline.tools.host import peak_rss_self

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    settings = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    weights = _matrices(params["model"], seed=0)
    if world > 1:
        dist.init_process_group("gloo")
        optimizer = ZeroRedundancyOptimizer(weights, optimizer_class=torch.optim.Muon, **settings)
        local = optimizer.optim
    else:
        optimizer = local = torch.optim.Muon(weights, **settings)
    seconds = _run(weights, optimizer, params["steps"], seed=0)
    state = sum(t.nbytes for s in local.state.values() for t in s.values() if torch.is_tensor(t))
    mine = sum(len(g["params"]) for g in local.param_groups)
    peak = peak_rss_self()
    reference = _matrices(params["model"], seed=0)
    _run(reference, torch.optim.Muon(reference, **settings), params["steps"], seed=0)
    identical = all(torch.equal(a, b) for a, b in zip(weights, reference))
    if world > 1:
        dist.destroy_process_group()
    return {
        "step_s": statistics.median(seconds[1:]),
        "state_bytes": state,
        "peak_rss": peak,
        "identical": identical,
        "matrices": mine,
    }


def bench_muon(case=MUON_CASE) -> list[MuonResult]:
    """The one-process run, then the split run (each in fresh processes)."""
    from pipeline.tools.bench.child import run_child, run_ranks

    model, processes, steps = case
    out = []
    for n in (1, processes):
        params = {"model": model, "steps": steps}
        ranks = (
            [run_child(muon_child, params, {"OMP_NUM_THREADS": "1"})]
            if n == 1
            else run_ranks(muon_child, params, n, {"OMP_NUM_THREADS": "1"})
        )
        out.append(
            MuonResult(
                n,
                max(r["step_s"] for r in ranks),
                max(r["state_bytes"] for r in ranks),
                max(r["peak_rss"] for r in ranks),
                all(r["identical"] for r in ranks),
                [r["matrices"] for r in ranks],
            )
        )
        print(f"muon on {n} process(es): {out[-1].step_s:.3f} s per step", flush=True)
    return out


def render_muon(results: list[MuonResult], case=MUON_CASE) -> str:
    model, _, steps = case
    one = results[0]
    rows = [
        [
            str(r.processes),
            " + ".join(map(str, r.matrices)),
            fmt_s(r.step_s),
            f"{r.step_s / one.step_s:.2f}×",
            fmt_mib(r.state_bytes),
            fmt_mib(r.peak_rss),
            "yes" if r.identical else "**no**",
        ]
        for r in results
    ]
    return "\n".join(
        [
            "### muon: the optimizer step split over processes",
            "",
            f"torch.optim.Muon on the block matrices of {model} ({sum(results[0].matrices)} "
            "matrices, float32), the same seeded gradients on every process; several processes run "
            "it inside ZeroRedundancyOptimizer (gloo, one thread each), as a data-parallel run "
            "with "
            f"optim=muon does. Median of {steps - 1} steps after one warm-up; the slowest process, "
            "the largest state and peak RSS of one process. Identical: every weight bit-equal to "
            "torch.optim.Muon on every matrix after the same steps. The peak RSS is mostly what "
            "every process holds alike (the interpreter and torch, weights, gradients); the state "
            "column is what the split saves per GPU.",
            "",
            table(
                [
                    "processes",
                    "matrices per process",
                    "step (s)",
                    "vs 1 process",
                    "Muon state per process",
                    "peak RSS per process",
                    "identical",
                ],
                rows,
            ),
        ]
    )
