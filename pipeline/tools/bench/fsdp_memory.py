"""The FSDP memory benchmark: the peak memory of one process of a real FSDP2 training step,
measured, against `pipeline.tools.memory_estimate.estimate_memory(sharded=True)`.

Each of `processes` processes (torch.distributed.run, gloo, one CPU thread each) builds the run
of a Hydra override list as `make max-batch` does (pipeline.tools.probe.RunProbe: build_model
with FSDP2 and its MixedPrecisionPolicy, the optimizer, the training step with two micro-batches
of gradient accumulation), and runs two optimizer steps on random tokens under torch's
FSDPMemTracker (torch.distributed._tools.fsdp2_mem_tracker), which follows every tensor the
step allocates, by kind (sharded and unsharded parameters and gradients, optimizer states,
activations, all-gather and reduce-scatter buffers). Its peak is what a CUDA device's
`max_memory_allocated` counts, without the caching allocator's rounding: the figure the
estimate is for. The second step is the larger (its optimizer states exist and its
gradients are held across its micro-steps); the peak is over both.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.tools.render import fmt_mib, table

FSDP_MEMORY_CASES = (
    ("gpt2", 2, 256, "fp32", "adamw"),
    ("gpt2", 2, 256, "bf16", "adamw"),
    ("gpt2_medium", 1, 256, "fp32", "adamw"),
)
"""(model preset, micro_batch_size, block_size, precision, optimizer), each on 2 processes."""
PROCESSES = 2


@dataclass
class FsdpMemoryResult:
    model: str
    micro_batch_size: int
    block_size: int
    precision: str
    optimizer: str
    processes: int
    measured: int
    """Peak bytes of the largest process (FSDPMemTracker)."""
    estimated: int
    """estimate_memory(..., sharded=True)["total"] for the same run."""
    kinds: dict[str, int]
    """The measured peak by kind of tensor, at the moment of the peak (bytes)."""

    @property
    def ratio(self) -> float:
        """estimated / measured."""
        return self.estimated / self.measured


def case_overrides(
    model: str, micro_batch_size: int, block_size: int, precision: str, optimizer: str
) -> list[str]:
    """The Hydra overrides of a case: that model and micro-batch, FSDP on the CPU."""
    return [
        f"model={model}",
        f"trainer.micro_batch_size={micro_batch_size}",
        f"data.block_size={block_size}",
        f"runtime.precision={precision}",
        f"optim={optimizer}",
        "runtime.fsdp=true",
        "runtime.cpu=true",
        "runtime.compile=false",
    ]


def fsdp_memory_child(params: dict) -> dict:
    """In one of the processes torch.distributed.run started: see the module docstring.
    params: {"overrides": [...]}; returns {"peak": bytes, "kinds": {kind: bytes}}."""
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from pipeline.config.cli import compose_train
    from pipeline.tools.probe import RunProbe

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = compose_train(params["overrides"])
    probe = RunProbe.build(cfg, data_parallel=False)
    b, t, vocab = cfg.trainer.micro_batch_size, cfg.block_size, cfg.model.vocab_size
    generator = torch.Generator().manual_seed(dist.get_rank())

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab, (b, t + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]

    optimizer = probe.step.optimizer.optimizers[0]
    tracker = FSDPMemTracker(probe.model, optimizer)
    model = probe.step.forward

    def forward(x: torch.Tensor, y: torch.Tensor):
        tracker.reset_mod_stats()  # per-module statistics of one forward at a time; the peak stays
        return model(x, y)

    probe.step.forward = forward
    with tracker:
        for step in (1, 2):
            probe.step(step, 1.0, next_batch)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    dist.destroy_process_group()
    kinds = {str(k).rpartition(".")[2].lower(): v for k, v in peak.items() if k != "Total"}
    return {"peak": peak["Total"], "kinds": kinds}


def bench_fsdp_memory(
    cases=FSDP_MEMORY_CASES, processes: int = PROCESSES
) -> list[FsdpMemoryResult]:
    """Measure and estimate each case (each in fresh processes)."""
    from pipeline.config.cli import compose_train
    from pipeline.tools.bench.child import run_ranks
    from pipeline.tools.memory_estimate import estimate_memory

    out = []
    for case in cases:
        overrides = case_overrides(*case)
        ranks = run_ranks(
            fsdp_memory_child, {"overrides": overrides}, processes, {"OMP_NUM_THREADS": "1"}
        )
        top = max(ranks, key=lambda r: r["peak"])
        cfg = compose_train(overrides)
        model, b, t, precision, optimizer = case
        estimate = estimate_memory(
            cfg.model,
            b,
            t,
            precision,
            processes,
            sharded=True,
            optimizer=optimizer,
            device_type="cpu",
        )
        out.append(
            FsdpMemoryResult(
                model,
                b,
                t,
                precision,
                optimizer,
                processes,
                top["peak"],
                estimate["total"],
                top["kinds"],
            )
        )
        print(
            f"fsdp memory {case}: measured {top['peak'] / 2**20:.0f} MiB, estimated "
            f"{estimate['total'] / 2**20:.0f} MiB",
            flush=True,
        )
    return out


def render_fsdp_memory(results: list[FsdpMemoryResult]) -> str:
    rows = [
        [
            r.model,
            f"{r.micro_batch_size} × {r.block_size}",
            r.precision,
            r.optimizer,
            fmt_mib(r.measured),
            fmt_mib(r.estimated),
            f"{r.ratio - 1:+.0%}",
            ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r.kinds.items() if v >= 2**20),
        ]
        for r in results
    ]
    return "\n".join(
        [
            "### fsdp-memory: the memory estimate against a measured FSDP2 step",
            "",
            f"One process of {results[0].processes} (gloo, CPU) running two optimizer steps of two "
            "micro-batches each with FSDP2 full shard as training builds it (bf16: "
            "MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)); measured: the peak "
            "of every tensor allocated (torch's FSDPMemTracker, what CUDA's max_memory_allocated "
            "counts); estimated: `estimate_memory(..., sharded=True)` (`make memory`). The kinds "
            "are the measured peak's parts, MiB.",
            "",
            table(
                [
                    "model",
                    "micro-batch",
                    "precision",
                    "optimizer",
                    "measured",
                    "estimated",
                    "error",
                    "measured by kind (MiB)",
                ],
                rows,
            ),
        ]
    )
