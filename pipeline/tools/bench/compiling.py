"""The compile benchmark: what torch.compile makes of a GPT-2 124M training step, by the number
of chunks the loss is cut into.

The chunked loss (pipeline.model.chunked_cross_entropy) runs a Python loop over chunks of
positions, which torch.compile unrolls: its graph, and its compile time, grow with the number of
chunks. GPT-2 124M at 64 × 1024 on a GPU took 256 chunks with the earlier fixed 256-row chunks,
and takes 16 with chunks sized by the device's budget (pipeline.model.loss_chunk_rows). Each case
compiles the model at a micro-batch that fits a CPU (1 × 1024), with as many chunks as the
64 × 1024 run takes, in a fresh process with an empty Inductor cache: the compile time (the
first forward + backward of the compiled model less the second), then the graphs, graph breaks
and operations of the forward (torch._dynamo.explain) and the operations of the forward and
backward graphs AOTAutograd hands on. Times in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.tools.render import fmt_s, table

COMPILE_CASE = (
    "gpt2",
    1,
    1024,
    (("fixed 256-row chunks (before)", 256), ("1 GiB per chunk on CUDA, at most 16 (now)", 16)),
)
"""(model, micro_batch_size, block_size, ((label, chunks), ...)) of the compile benchmark."""
RUN_SHAPE = (64, 1024)
"""The micro-batch of the gpt2_124m_10bt recipe on an 80 GB GPU, whose chunks are compared."""


@dataclass
class CompileResult:
    label: str
    chunks: int
    chunk_rows: int
    graphs: int
    graph_breaks: int
    ops: int
    aot_forward: int
    aot_backward: int
    compile_s: float
    first_s: float
    second_s: float


def compile_child(params: dict) -> dict:
    """In a fresh process: explain and compile one chunking (see the module docstring)."""
    import torch

    from pipeline.model import GPT, PRESETS

    torch.manual_seed(0)
    model = GPT(PRESETS[params["model"]])
    b, t = params["micro_batch_size"], params["block_size"]
    model.loss_chunk_rows = b * t // params["chunks"]
    x = torch.randint(0, 50257, (b, t))
    y = torch.randint(0, 50257, (b, t))
    compiled = torch.compile(model)  # timed first, with nothing traced before in the process
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        _, loss = compiled(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, y)
    torch._dynamo.reset()
    aot = _aot_graph_sizes(model, x, y)
    return {
        "chunk_rows": model.loss_chunk_rows,
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "ops": explained.op_count,
        "aot_forward": aot["forward"],
        "aot_backward": aot["backward"],
        "first_s": seconds[0],
        "second_s": seconds[1],
    }


def _aot_graph_sizes(model, x, y) -> dict[str, int]:
    """Operations (call_function nodes) of the forward and backward graphs AOTAutograd hands to
    Inductor for one training step: where an unrolled chunk loop shows (dynamo's explain sees
    the loss's autograd.Function as one operation)."""
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    sizes = {"forward": 0, "backward": 0}

    def counting(kind: str):
        def compiler(gm, example_inputs):
            sizes[kind] += sum(1 for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    _, loss = torch.compile(model, backend=backend)(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sizes


def bench_compile(case=COMPILE_CASE) -> list[CompileResult]:
    """One fresh process per chunking of the case, each with an empty Inductor cache of its own
    (a first launch; a warm on-disk cache makes later compiles of the same graphs faster)."""
    import tempfile

    from pipeline.tools.bench.child import run_child

    model, b, t, chunkings = case
    out = []
    for label, chunks in chunkings:
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            r = run_child(
                compile_child,
                {"model": model, "micro_batch_size": b, "block_size": t, "chunks": chunks},
                env={"TORCHINDUCTOR_CACHE_DIR": cache},
            )

        out.append(
            CompileResult(
                label,
                chunks,
                r["chunk_rows"],
                r["graphs"],
                r["graph_breaks"],
                r["ops"],
                r["aot_forward"],
                r["aot_backward"],
                r["first_s"] - r["second_s"],
                r["first_s"],
                r["second_s"],
            )
        )
        print(
            f"compile {chunks} chunks: {out[-1].aot_forward} + {out[-1].aot_backward} ops, "
            f"{out[-1].compile_s:.1f} s",
            flush=True,
        )
    return out


def render_compile(results: list[CompileResult], case=COMPILE_CASE) -> str:
    from pipeline.model import LOSS_CHUNK_BYTES, MAX_LOSS_CHUNKS, PRESETS, loss_chunk_rows

    model, b, t, _ = case
    rows_now = loss_chunk_rows(PRESETS[model].embedding_rows, RUN_SHAPE[0] * RUN_SHAPE[1], "cuda")
    rows = [
        [
            r.label,
            str(r.chunks),
            f"{r.chunk_rows} × {b}" if b > 1 else str(r.chunk_rows),
            str(r.graphs),
            str(r.graph_breaks),
            str(r.ops),
            f"{r.aot_forward:,}",
            f"{r.aot_backward:,}",
            fmt_s(r.compile_s),
            fmt_s(r.first_s),
            fmt_s(r.second_s),
        ]
        for r in results
    ]
    before, after = results[0], results[-1]
    return "\n".join(
        [
            "### compile: the chunked loss under torch.compile",
            "",
            f"GPT-2 124M ({model}) at {RUN_SHAPE[0]} × {RUN_SHAPE[1]} on a GPU: "
            f"{RUN_SHAPE[0] * RUN_SHAPE[1] // 256} loss chunks of 256 positions before, "
            f"{RUN_SHAPE[0] * RUN_SHAPE[1] // rows_now} chunks of {rows_now:,} now "
            f"(`loss_chunk_rows`: {LOSS_CHUNK_BYTES['cuda'] >> 20} MiB of float32 logits per chunk "
            "on "
            f"CUDA, at most {MAX_LOSS_CHUNKS} chunks). The compiled training step of the same "
            "model "
            f"at {b} × {t}, float32 on the CPU, with as many chunks as that run takes, one fresh "
            "process and empty Inductor cache (`TORCHINDUCTOR_CACHE_DIR`) per row, as at a first "
            "launch: graphs, graph breaks and operations dynamo traces in the forward "
            "(`torch._dynamo.explain`, which counts the loss's autograd.Function as one); the "
            "operations of the forward and backward graphs AOTAutograd hands to Inductor (where "
            "the unrolled chunk loop shows: a counting backend); compile time = first forward + "
            "backward of `torch.compile(model)` (Inductor) less the second.",
            "",
            table(
                [
                    "chunking",
                    "chunks",
                    "rows per chunk",
                    "graphs",
                    "graph breaks",
                    "dynamo ops",
                    "AOT forward ops",
                    "AOT backward ops",
                    "compile s",
                    "first call s",
                    "second call s",
                ],
                rows,
            ),
            "",
            f"Operations handed to Inductor {before.aot_forward + before.aot_backward:,} → "
            f"{after.aot_forward + after.aot_backward:,}; compile time "
            f"{fmt_s(before.compile_s)} → {fmt_s(after.compile_s)} s "
            f"({before.compile_s / after.compile_s:.1f}× shorter).",
        ]
    )
