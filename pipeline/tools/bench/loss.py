"""The loss benchmark: the output layer and cross-entropy in chunks against full logits.

Peak memory and step time of real training steps with `runtime.loss_impl=chunked` (the default)
and `full` (the (B, T, V) logits): the tiny model at 16 x 256 and GPT-2 124M at 4 x 1024, each
run in a fresh process. Times in seconds, memory in bytes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.tools.bench.train import TrainResult, pool_runs, train_in_child
from pipeline.tools.render import fmt_mib, fmt_s, table

LOSS_CASES = (("tiny", 16, 256, 2, 8), ("gpt2", 4, 1024, 1, 1))
"""(model, micro_batch_size, block_size, warm-up steps, measured steps) of the loss benchmark:
the tiny model at 16 x 256 (the demo's batch until it moved to 8 x 256) and GPT-2 124M at
4 x 1024."""


def bench_loss(
    shard_dir: Path, work: Path, cases=LOSS_CASES, repeats: int = 2
) -> list[tuple[TrainResult, TrainResult]]:
    """For each case, (full, chunked): `repeats` fresh training processes per loss_impl, the
    two alternating, compile off, fp32 on CPU (bf16 on CUDA), no validation."""
    out = []
    for model, b, t, warmup, steps in cases:
        runs: dict[str, list[TrainResult]] = {"full": [], "chunked": []}
        for impl in [i for _ in range(repeats) for i in runs]:
            params = {
                "model": model,
                "shard_dir": str(shard_dir),
                "micro_batch_size": b,
                "block_size": t,
                "steps": warmup + steps,
                "compile": False,
                "compile_mode": "default",
                "peak_flops": None,
                "loss_impl": impl,
            }
            result = train_in_child(params, work, warmup)
            print(
                f"loss {model} {b}x{t} {impl}: {result.step_time_s:.3f} s/step, peak "
                f"{fmt_mib(result.cuda_peak or result.peak_rss)}",
                flush=True,
            )
            runs[impl].append(result)
        out.append((pool_runs(runs["full"]), pool_runs(runs["chunked"])))
    return out


def render_loss(pairs: list[tuple[TrainResult, TrainResult]]) -> str:
    """The loss section: one row per model and loss_impl, with the change against full."""
    rows = []
    for full, chunked in pairs:
        peak = {r.loss_impl: r.cuda_peak or r.peak_rss for r in (full, chunked)}
        for r in (full, chunked):
            change = (
                ""
                if r is full
                else (
                    f"memory {100 * (peak['chunked'] / peak['full'] - 1):+.0f}%, step time "
                    f"{100 * (chunked.step_time_s / full.step_time_s - 1):+.1f}%"
                )
            )
            rows.append(
                [
                    f"{r.model} ({r.params:,})",
                    f"{r.micro_batch_size} × {r.block_size}",
                    f"`{r.loss_impl}`",
                    fmt_s(r.step_time_s),
                    str(len(r.measured_s)),
                    fmt_mib(peak[r.loss_impl]),
                    change,
                ]
            )
    cuda = pairs[0][0].cuda_peak is not None
    memory = "`torch.cuda.max_memory_allocated`" if cuda else "the process's peak RSS (VmHWM)"
    return "\n".join(
        [
            "### loss: the output layer without (B, T, V) logits",
            "",
            "`pipeline.training.loop.train` in a fresh process per run, `runtime.loss_impl=full` "
            "(the "
            "(B, T, V) logits, their float32 copy and gradient, as nanoGPT) and `chunked` (the "
            "default: on a CPU 256 positions at a time, gradients computed in the forward; "
            "`pipeline.model.chunked_cross_entropy`), the two alternating; precision "
            f"{pairs[0][0].precision}, compile off, no validation. Step time: median of "
            f"`step_time_s` after the warm-up steps; peak memory: {memory} of the run, which "
            "includes the model, the optimizer states and, on CPU, the interpreter.",
            "",
            table(
                [
                    "model",
                    "micro-batch",
                    "loss_impl",
                    "step time s",
                    "steps",
                    "peak memory",
                    "chunked vs full",
                ],
                rows,
            ),
        ]
    )
