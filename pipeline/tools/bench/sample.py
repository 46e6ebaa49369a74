"""The sampling benchmark: `GPT.generate` with the KV cache against without it.

GPT-2 124M (random weights: the time does not depend on their values) continues a 32-token
prompt by 256 tokens, greedily, batch 1, in this process: with the cache (one forward of the
prompt, then one of each new token) and without it (the whole context at every step), the two
alternating, each way `repeats` times, on torch's threads and on one thread. Both ways must give
the same tokens. Times in seconds.

Why one thread as well: on a CPU shared with other jobs, an intra-op parallel region waits
whenever one of its threads is descheduled, so timings on all cores swing with the load; on one
thread they swing much less.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.model import GPT, PRESETS
from pipeline.tools.host import load_average
from pipeline.tools.render import fmt_n, fmt_s, table

SAMPLE_CASE = ("gpt2", 32, 256, 2)
"""(model, prompt tokens, new tokens, timings per way) of the sampling benchmark."""


@dataclass
class SampleRound:
    """One timed `generate` call."""

    use_cache: bool
    threads: int
    """torch.get_num_threads() during the call."""
    seconds: float
    load_before: float
    """1-minute load average just before the call."""


@dataclass
class SampleResult:
    """Every timed call of one model and case, and whether all gave the same tokens."""

    model: str
    params: int
    prompt_tokens: int
    new_tokens: int
    device: str
    rounds: list[SampleRound]
    same_tokens: bool
    """Whether every call, with and without the cache, gave the same tokens."""

    @property
    def threads(self) -> list[int]:
        """The thread counts measured, in order."""
        return list(dict.fromkeys(r.threads for r in self.rounds))

    def seconds(self, use_cache: bool, threads: int) -> float:
        """Seconds of the fastest call with or without the cache on `threads` threads: the one
        least slowed by other processes (on a shared machine the slower calls measure them)."""
        return min(
            r.seconds for r in self.rounds if (r.use_cache, r.threads) == (use_cache, threads)
        )

    def speedup(self, threads: int) -> float:
        """Fastest time without the cache over fastest time with it, on `threads` threads."""
        return self.seconds(False, threads) / self.seconds(True, threads)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sample(
    model: str = "gpt2",
    prompt_tokens: int = 32,
    new_tokens: int = 256,
    repeats: int = 2,
    threads: tuple[int, ...] | None = None,
) -> SampleResult:
    """Time greedy `generate` of new_tokens after a random prompt of prompt_tokens, with and
    without the KV cache, `repeats` times each, alternating (the first way alternates too),
    after a warm-up of 2 new tokens each way; on each thread count of `threads` (default:
    torch's, then 1). On CUDA when available (the thread count then matters little), else
    the CPU; float32. torch's thread count is restored after."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, default_threads = PRESETS[model], torch.get_num_threads()
    torch.manual_seed(0)
    gpt = GPT(cfg).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), device=device)
    rounds, outputs = [], []
    try:
        for n in threads or tuple(dict.fromkeys((default_threads, 1))):
            torch.set_num_threads(n)
            for use_cache in (True, False):  # first calls: allocator, kernels, thread pool
                gpt.generate(prompt, 2, temperature=0, use_cache=use_cache)
            for r in range(repeats):
                for use_cache in (True, False) if r % 2 == 0 else (False, True):
                    load = load_average()[0]
                    _synchronize(device)
                    start = time.perf_counter()
                    outputs.append(
                        gpt.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
                    )
                    _synchronize(device)
                    rounds.append(SampleRound(use_cache, n, time.perf_counter() - start, load))
                    print(
                        f"sample {model} {n} threads, cache {'on' if use_cache else 'off'}: "
                        f"{rounds[-1].seconds:.2f} s",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(default_threads)
    same = all(torch.equal(outputs[0], out) for out in outputs)
    return SampleResult(
        model, gpt.num_params(), prompt_tokens, new_tokens, str(device), rounds, same
    )


def _row(call: str, threads: int, use_cache: bool, seconds: float, n: int, load: str):
    return [
        call,
        str(threads),
        "on" if use_cache else "off",
        fmt_s(seconds),
        fmt_n(n / seconds),
        f"{1000 * seconds / n:.1f}",
        load,
    ]


def render_sample(result: SampleResult) -> str:
    """The sampling section: every timed call, then the medians and the speed-ups."""
    r, n = result, result.new_tokens
    rows = [
        _row(str(i + 1), x.threads, x.use_cache, x.seconds, n, f"{x.load_before:.2f}")
        for i, x in enumerate(r.rounds)
    ]
    per_way = len(r.rounds) // (2 * len(r.threads))
    rows += [
        _row(f"fastest of {per_way}", t, c, r.seconds(c, t), n, "")
        for t in r.threads
        for c in (True, False)
    ]
    speedups = ", ".join(
        f"**{r.speedup(t):.1f}× faster** on {t} thread{'s' if t > 1 else ''}" for t in r.threads
    )
    same = "the same tokens" if r.same_tokens else "**different tokens** (a bug)"
    return "\n".join(
        [
            "### sample: generation with and without the KV cache",
            "",
            f"`GPT.generate(prompt, {n}, temperature=0)` (greedy, batch 1, float32) of `{r.model}` "
            f"({r.params:,} parameters, random weights) after a {r.prompt_tokens}-token random "
            f"prompt, on {r.device}, in one process: `use_cache=True` "
            "(the default: one forward of the prompt, then one of each new token against the "
            "cached "
            "keys and values) and `use_cache=False` (the whole context at every step), "
            "alternating, "
            f"after a 2-token warm-up each way, on {' then '.join(map(str, r.threads))} threads "
            "(torch's count, then 1: on a CPU shared with other jobs, a parallel region waits "
            "whenever one of its threads is descheduled, so timings on all cores swing with the "
            f"load; on one thread much less). All calls gave {same}. "
            "Load: the 1-minute load average just before each call.",
            "",
            table(
                [
                    "call",
                    "threads",
                    "KV cache",
                    "seconds",
                    "new tokens/s",
                    "ms per token",
                    "load before",
                ],
                rows,
            ),
            "",
            f"With the cache: {speedups} (fastest without / fastest with; target ≥ 5×).",
        ]
    )
