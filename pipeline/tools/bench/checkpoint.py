"""The checkpoint benchmark: what a save costs the training loop, and what a resume costs.

For each case (model preset, optimizer, processes), `processes` CPU processes
(torch.distributed.run, gloo, one thread each) build the model and optimizers as training does
(build_model, build_optimizer: FSDP2 full shard for AdamW on two processes, replicated weights and
ZeroRedundancyOptimizer's split Muon for Muon on two, as a two-GPU run of each would be built),
fill the optimizer states with one step, and save the same state three ways:

- format 1: the save before DCP, as `pipeline.training.checkpoint.folder` wrote it until format 2
  (`save_format_1` here repeats it): the whole model and optimizer state gathered to the main
  process's CPU (get_model_state_dict(full_state_dict=True, cpu_offload=True); a split Muon
  consolidated to rank 0), then `torch.save` of model.pt and optimizer.pt, fsync and sha256,
  while every process waits;
- DCP, synchronous (`checkpoint.async_save=false`): save_checkpoint with TensorSaver(False);
- DCP, asynchronous (the default): save_checkpoint with TensorSaver(True), twice with the same
  saver (the first save allocates the staging buffers that later saves reuse).

Blocked: seconds from the call until the loop may change the weights again (the call returns),
the slowest process. Total: seconds until the checkpoint is complete (every file written,
state.json, rename), the slowest process. Then, in fresh processes for each format, a resume
as the run's Checkpointer does it: every process verifies the checkpoint (sizes, sha256, the
safety scan) and loads it into a newly built model and optimizer (load_checkpoint). Resume
seconds are the slowest process's; the peak RSS is the largest process's VmHWM during the
resume (reset just before it), with its RSS before the resume (the model and optimizer built).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.tools.render import fmt_mib, fmt_s, table

CHECKPOINT_CASES = (
    ("gpt2", "adamw", 1),
    ("gpt2", "muon", 1),
    ("gpt2", "adamw", 2),
    ("gpt2", "muon", 2),
    ("gpt2_medium", "adamw", 1),
    ("gpt2_medium", "muon", 1),
    ("gpt2_medium", "adamw", 2),
    ("gpt2_medium", "muon", 2),
)
"""(model preset, optimizer, processes)."""
FORMATS = ("format 1", "DCP sync", "DCP async")


@dataclass
class CheckpointResult:
    model: str
    optimizer: str
    processes: int
    layout: str
    """How the weights and states are split over the processes."""
    saved_bytes: int
    """Bytes of the DCP checkpoint's files."""
    blocked: dict[str, float]
    """Seconds the loop waits per save, by FORMATS (DCP async: the second save)."""
    first_async_blocked: float
    """Seconds blocked by the first asynchronous save (staging buffers allocated)."""
    total: dict[str, float]
    """Seconds until the checkpoint is complete, by FORMATS."""
    resume: dict[str, float]
    """Seconds of a resume, by "format 1" and "DCP"."""
    resume_peak_rss: dict[str, int]
    """Peak RSS of the largest process during a resume, by "format 1" and "DCP" (bytes)."""
    built_rss: dict[str, int]
    """RSS of that process before the resume (model and optimizer built; bytes)."""


def case_overrides(model: str, optimizer: str, processes: int) -> list[str]:
    """A run of that model and optimizer on the CPU in fp32, sharded with FSDP2 for AdamW on
    several processes (Muon with FSDP is refused: it runs data parallel, its matrices split)."""
    fsdp = processes > 1 and optimizer == "adamw"
    return [
        f"model={model}",
        f"optim={optimizer}",
        f"runtime.fsdp={str(fsdp).lower()}",
        "runtime.cpu=true",
        "runtime.compile=false",
        "runtime.precision=fp32",
    ]


def layout(optimizer: str, processes: int) -> str:
    if processes == 1:
        return "one process"
    return "FSDP2 full shard" if optimizer == "adamw" else "replicated, Muon split (ZeRO)"


def _build(overrides: list[str]):
    """The run's model and optimizers on this process (the group is initialised)."""
    import torch
    import torch.distributed as dist

    from pipeline.config.cli import compose_train
    from pipeline.training.loop import build_model
    from pipeline.training.optim import build_optimizer

    cfg = compose_train(overrides)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg, torch.device("cpu"), rank)
    return model, build_optimizer(model, cfg.optim, "cpu", world)


def save_format_1(folder: Path, model, optimizers: list) -> None:
    """Write model.pt and optimizer.pt as format 1 did (see the module docstring): collective,
    the files written by rank 0 while the others wait. For measurement only."""
    from itertools import chain

    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import FSDPModule

    from pipeline.training.checkpoint.folder import MODEL, OPTIMIZER, _save
    from pipeline.training.optim import is_sharded

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for opt in optimizers:
        if is_sharded(opt):
            opt.consolidate_state_dict(to=0)
    main = dist.get_rank() == 0
    if main or isinstance(model, FSDPModule):
        model_state = get_model_state_dict(model, options=full)
        plain = [opt for opt in optimizers if not is_sharded(opt)]
        named = get_optimizer_state_dict(model, plain, options=full)
        if main:
            names = {p: n for n, p in model.named_parameters()}
            for opt in filter(is_sharded, optimizers):  # its state keyed by parameter name
                params = chain.from_iterable(g["params"] for g in opt.param_groups)
                order = [names[p] for p in params]
                saved = opt.state_dict()
                named["state"].update({order[i]: s for i, s in saved["state"].items()})
                named["param_groups"][:0] = [
                    {**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]
                ]
            folder.mkdir(parents=True)
            _save(model_state, folder / MODEL)
            _save(named, folder / OPTIMIZER)
            _save({"torch": torch.get_rng_state()}, folder / "rng.pt")
    dist.barrier()


def _filled(overrides: list[str]):
    """Model and optimizers with their states (one step on small constant gradients)."""
    import torch

    model, optimizers = _build(overrides)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-4)
    optimizers.step()
    optimizers.zero_grad()
    return model, optimizers


def checkpoint_save_child(params: dict) -> dict:
    """In one of the processes torch.distributed.run started: the three saves of the module
    docstring into params["dir"]; returns this process's seconds by format."""
    import torch
    import torch.distributed as dist

    from pipeline.training.checkpoint.folder import save_checkpoint
    from pipeline.training.checkpoint.tensors import TensorSaver

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, optimizers = _filled(params["overrides"])
    main, out = dist.get_rank() == 0, Path(params["dir"])
    blocked, total = {}, {}

    start = time.perf_counter()
    save_format_1(out / "format_1", model, optimizers.raw)
    blocked["format 1"] = total["format 1"] = time.perf_counter() - start

    def save(run: str, step: int, saver: TensorSaver) -> tuple[float, float]:
        dist.barrier()
        start = time.perf_counter()
        _, done = save_checkpoint(
            out / run, step, model, optimizers.raw, {} if main else None, keep_last=1, saver=saver
        )
        returned = time.perf_counter() - start
        done.result()
        dist.barrier()  # complete on every process
        return returned, time.perf_counter() - start

    cpu = torch.device("cpu")
    blocked["DCP sync"], total["DCP sync"] = save("sync", 1, TensorSaver(False, cpu))
    saver = TensorSaver(True, cpu)
    first, _ = save("async", 1, saver)
    blocked["DCP async"], total["DCP async"] = save("async", 2, saver)
    saver.close()
    dist.destroy_process_group()
    return {"blocked": blocked, "total": total, "first_async_blocked": first}


def checkpoint_resume_child(params: dict) -> dict:
    """In one of the processes torch.distributed.run started: build the model and optimizers,
    then verify and load checkpoint params["path"] as a resume does; returns seconds and RSS."""
    import torch
    import torch.distributed as dist

    from pipeline.tools.host import peak_rss_self, rss_self
    from pipeline.training.checkpoint.folder import load_checkpoint, verify

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, optimizers = _build(params["overrides"])
    path, rank = Path(params["path"]), dist.get_rank()
    gc.collect()
    built = rss_self() or 0
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on (Linux)
    dist.barrier()
    start = time.perf_counter()
    verify(path)
    load_checkpoint(path, model, optimizers.raw, restore_rng=False, rank=rank, verified=True)
    dist.barrier()
    seconds = time.perf_counter() - start
    peak = peak_rss_self()
    dist.destroy_process_group()
    return {"seconds": seconds, "peak_rss": peak, "built_rss": built}


def bench_checkpoint(cases=CHECKPOINT_CASES) -> list[CheckpointResult]:
    """Measure each case (fresh processes for the saves and for each resume)."""
    import shutil
    import tempfile

    from pipeline.tools.bench.child import run_ranks
    from pipeline.training.checkpoint.folder import list_checkpoints

    env = {"OMP_NUM_THREADS": "1"}
    out = []
    for model, optimizer, processes in cases:
        overrides = case_overrides(model, optimizer, processes)
        with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
            saves = run_ranks(
                checkpoint_save_child, {"overrides": overrides, "dir": tmp}, processes, env
            )
            dcp_path = list_checkpoints(Path(tmp) / "async")[-1]
            saved_bytes = sum(f.stat().st_size for f in dcp_path.iterdir())
            shutil.rmtree(Path(tmp) / "sync")
            resumes = {}
            for name, path in (("format 1", Path(tmp) / "format_1"), ("DCP", dcp_path)):
                if name == "format 1":  # a state.json as format 1 wrote it, for the loader
                    _state_json_of_format_1(path)
                resumes[name] = run_ranks(
                    checkpoint_resume_child,
                    {"overrides": overrides, "path": str(path)},
                    processes,
                    env,
                )
        slowest = {k: max(r["blocked"][k] for r in saves) for k in FORMATS}
        result = CheckpointResult(
            model,
            optimizer,
            processes,
            layout(optimizer, processes),
            saved_bytes,
            slowest,
            max(r["first_async_blocked"] for r in saves),
            {k: max(r["total"][k] for r in saves) for k in FORMATS},
            {k: max(r["seconds"] for r in rs) for k, rs in resumes.items()},
            {k: max(r["peak_rss"] for r in rs) for k, rs in resumes.items()},
            {k: max(rs, key=lambda r: r["peak_rss"])["built_rss"] for k, rs in resumes.items()},
        )
        out.append(result)
        print(
            f"checkpoint {model} {optimizer} x{processes}: blocked "
            + ", ".join(f"{k} {v:.2f} s" for k, v in slowest.items()),
            flush=True,
        )
    return out


def _state_json_of_format_1(folder: Path) -> None:
    """state.json listing format 1's files with their sizes and sha256 (no "format" key)."""
    import json

    from pipeline.files import sha256_file
    from pipeline.training.checkpoint.folder import STATE

    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(folder.iterdir())
    }
    (folder / STATE).write_text(json.dumps({"step": 1, "files": files}))


def render_checkpoint(results: list[CheckpointResult]) -> str:
    rows = []
    for r in results:
        async_share = r.blocked["DCP async"] / r.blocked["format 1"]
        rows.append(
            [
                r.model,
                r.optimizer,
                f"{r.processes} ({r.layout})",
                fmt_mib(r.saved_bytes),
                " / ".join(fmt_s(r.blocked[k]) for k in FORMATS),
                fmt_s(r.first_async_blocked),
                f"{async_share:.1%}",
                " / ".join(fmt_s(r.total[k]) for k in FORMATS),
                " / ".join(fmt_s(r.resume[k]) for k in ("format 1", "DCP")),
                " / ".join(
                    f"{fmt_mib(r.resume_peak_rss[k])} ({fmt_mib(r.built_rss[k])})"
                    for k in ("format 1", "DCP")
                ),
            ]
        )
    return "\n".join(
        [
            "### checkpoint: seconds a save blocks training, save and resume time, resume memory",
            "",
            "Processes of torch.distributed.run (gloo, CPU, one thread each) holding a model and "
            "optimizer built as training builds them, states filled by one step. Three saves of "
            "the same state: format 1 (before DCP: the whole state gathered to rank 0 and written "
            "there with torch.save and sha256 while every process waits), DCP synchronous "
            "(`checkpoint.async_save=false`) and DCP asynchronous (the default; its second save, "
            "the first allocates the staging buffers: its blocked time is given apart). Blocked: "
            "seconds until the loop may change the weights again; total: until the checkpoint is "
            "complete (state.json written, folder renamed); the slowest process. Resume, in fresh "
            "processes: verify (sizes, sha256, safety scan) and load into a newly built model and "
            "optimizer, as a resumed run does; the peak RSS is the largest process's during the "
            "resume, its RSS with the model and optimizer built before it in brackets. Target "
            "(issue 24): blocked asynchronous ≤ 10% of format 1's. Muon on one process resumes "
            "slower in both formats: torch's set_optimizer_state_dict first fills an empty "
            "optimizer's state with one real step on zero gradients (`_init_optim_state`), which "
            "for Muon is a Newton–Schulz iteration on every matrix; Muon split over processes "
            "(ZeRO) loads its states without it.",
            "",
            table(
                [
                    "model",
                    "optimizer",
                    "processes",
                    "checkpoint",
                    "blocked s: format 1 / DCP sync / DCP async",
                    "first async",
                    "async / format 1",
                    "total s: format 1 / sync / async",
                    "resume s: format 1 / DCP",
                    "resume peak RSS: format 1 / DCP",
                ],
                rows,
            ),
        ]
    )
