"""The benchmark at its smallest sizes: results are well formed and rendered (speed is never
asserted: it depends on the machine and its load)."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.model import PRESETS
from pipeline.tools.bench import main
from pipeline.tools.bench.loader import bench_loader, render_loader
from pipeline.tools.bench.loss import bench_loss, render_loss
from pipeline.tools.bench.memory import bench_memory, render_memory
from pipeline.tools.bench.prepare import bench_prepare, documents_source, render_prepare
from pipeline.tools.bench.sample import bench_sample, render_sample
from pipeline.tools.bench.train import TrainResult, bench_train, pool_runs, render_train
from pipeline.tools.host import Device
from pipeline.tools.memory_estimate import GIB, estimate_memory
from pipeline.tools.render import (
    NO_GPU,
    RunInfo,
    device_section,
    merge_benchmarks,
    render_section,
    replace_parts,
)


@pytest.fixture(scope="module")
def prepared(fineweb_sample: Path, tmp_path_factory):
    """The prepare benchmark on 100 documents: one round, inputs of 1x and 2x."""
    work = tmp_path_factory.mktemp("bench")
    docs, source = documents_source(fineweb_sample, 100, work)
    return bench_prepare(docs, source, work, rounds=1, scales=(1, 2))


def test_prepare_benchmark_measures_both_sides_and_both_sizes(prepared):
    assert prepared.documents == 100 and prepared.tokens > 100
    assert prepared.workers >= 1
    assert len(prepared.tiktoken) == len(prepared.prepare) == 1
    assert all(t.wall_s > 0 and t.cores > 0 for t in prepared.tiktoken + prepared.prepare)
    assert prepared.tiktoken_tokens_per_s > 0 and prepared.prepare_tokens_per_s > 0
    assert prepared.ratio > 0
    small, large = prepared.sizes
    assert (small.scale, large.scale) == (1, 2)
    assert (small.documents, large.documents) == (100, 200)
    assert (small.tokens, large.tokens) == (prepared.tokens, 2 * prepared.tokens)
    for run in prepared.sizes:
        assert run.seconds > 0 and run.main_peak_rss > 0 and run.worker_peak_rss > 0
        assert run.main_cpu_s >= 0 and run.worker_cpu_s > 0
    assert (Path(prepared.shard_dir) / "manifest.json").is_file()
    text = render_prepare(prepared)
    assert "prepare / tiktoken" in text and "| sample ×2 | 200 |" in text
    assert "Memory from ×1 to ×2" in text


def test_loader_and_train_benchmarks_on_the_prepared_shards(prepared, tmp_path):
    shard_dir = Path(prepared.shard_dir)
    rates = bench_loader(shard_dir, ((16, 1024), (2, 64)), rounds=1, seconds=0.05)
    assert [(r.micro_batch_size, r.block_size) for r in rates] == [(16, 1024), (2, 64)]
    assert all(r.batches_per_s > 0 and r.tokens_per_s > 0 for r in rates)
    (train,) = bench_train(
        shard_dir, tmp_path, "tiny", 2, 64, warmup_steps=1, steps=1, compile_modes=(False,)
    )
    assert [len(run) for run in train.step_times_s] == [2] and train.step_time_s > 0
    assert train.tokens_per_step == 128 and train.tokens_per_s > 0
    assert train.mfu is None or train.mfu > 0  # None without a known peak (CPU)
    assert train.peak_rss > 0 and train.params > 0 and train.flops_per_token > 0
    loader_md = render_loader(rates, [train], str(shard_dir))
    assert "derived from the target, not measured" in loader_md  # the 16 x 1024 GPU row
    assert "tiny, compile off" in loader_md  # the 2 x 64 row, measured
    assert "| off |" in render_train([train], None)


@pytest.mark.slow  # 9 s of real GPT-2-sized steps; the loss itself is tested in test_model
def test_loss_benchmark_runs_both_implementations(prepared, tmp_path):
    (pair,) = bench_loss(Path(prepared.shard_dir), tmp_path, (("tiny", 2, 64, 1, 1),), repeats=1)
    full, chunked = pair
    assert (full.loss_impl, chunked.loss_impl) == ("full", "chunked")
    assert all(r.peak_rss > 0 and len(r.measured_s) == 1 for r in pair)
    text = render_loss([pair])
    assert "| tiny (7,265,024) | 2 × 64 | `full` |" in text
    assert "| tiny (7,265,024) | 2 × 64 | `chunked` |" in text and "memory " in text


def test_runs_of_one_setting_pool_their_measured_steps():
    run = TrainResult(
        "tiny", 1, 1, 2, 64, True, "cpu", "fp32", 1, [[9.0, 1.0, 3.0]], [[None] * 3], 10, None, 1.0
    )
    pooled = pool_runs([run, replace(run, step_times_s=[[7.0, 2.0]], peak_rss=20)])
    assert pooled.measured_s == [1.0, 3.0, 2.0] and pooled.step_time_s == 2.0
    assert pooled.first_step_s == 8.0 and pooled.warmup_overhead_s == 6.0  # medians of runs
    assert pooled.peak_rss == 20 and pooled.wall_s == 2.0


def test_a_run_replaces_only_its_own_device_section():
    def section(key: str, body: str) -> str:
        started = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        load = (0.0, 0.0, 0.0)
        info = RunInfo("python -m pipeline.bench", started, 1.0, load, load, {"python": "3"})
        device = Device(key, key.upper(), "cpu", 2, None if key.startswith("cpu") else key)
        return render_section(device, info, [body])

    text = merge_benchmarks("", "cpu: a", section("cpu: a", "first"))
    assert "first" in text and NO_GPU in text
    text = merge_benchmarks(text, "gpu: h", section("gpu: h", "on the gpu"))
    assert NO_GPU not in text
    text = merge_benchmarks(text, "cpu: a", section("cpu: a", "second"))
    assert "first" not in text and "second" in text and "on the gpu" in text
    assert text.index("second") < text.index("on the gpu")  # sections keep their order
    # text written by hand between and after the sections stays where it is
    hand = "## Host waits per step\n\nCounted by hand.\n"
    text = text.replace("<!-- bench:device gpu: h", hand + "\n<!-- bench:device gpu: h")
    text = merge_benchmarks(text, "cpu: a", section("cpu: a", "third"))
    assert "third" in text and text.index("third") < text.index(hand) < text.index("on the gpu")
    text = merge_benchmarks(text, "cpu: b", section("cpu: b", "new device"))
    assert text.index("on the gpu") < text.index("new device") and hand in text


def test_command_line_writes_the_markdown_file(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    main(["--quick", "--only", "loader,memory", "--max-documents", "100", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "### loader" in text and "### memory" in text
    assert "### prepare" not in text and "### train" not in text
    with pytest.raises(ConfigError, match="--only 'nothing'"):
        main(["--only", "nothing", "--out", str(out)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path gives estimates")
def test_memory_benchmark_without_cuda_gives_estimates_up_to_the_cap():
    results = bench_memory(block_size=1024, cap_bytes=40 * GIB)
    assert [r.model for r in results] == ["gpt2", "gpt2_medium"]
    small, medium = results
    assert not small.measured and small.params < medium.params
    for r in results:
        assert list(r.peaks) == [2**k for k in range(r.largest.bit_length())]
        peaks = list(r.peaks.values())
        assert peaks == sorted(peaks) and peaks[-1] <= 40 * GIB
        cfg = PRESETS[r.model]
        assert estimate_memory(cfg, 2 * r.largest, 1024)["total"] > 40 * GIB
    assert small.largest > medium.largest >= 1
    text = render_memory(results)
    assert "not measurements" in text and "| micro_batch_size | gpt2 (124M) GiB |" in text
    assert f"gpt2 {small.largest}, gpt2_medium {medium.largest}" in text


def test_sample_benchmark_times_both_ways_and_checks_the_tokens():
    result = bench_sample("tiny", prompt_tokens=4, new_tokens=3, repeats=2, threads=(2, 1))
    ways = [(r.threads, r.use_cache) for r in result.rounds]
    assert ways == [(t, c) for t in (2, 1) for c in (True, False, False, True)]  # alternating
    assert result.same_tokens and all(r.seconds > 0 for r in result.rounds)
    assert result.speedup(1) > 0 and result.params == 7_265_024 and result.threads == [2, 1]
    text = render_sample(result)
    assert text.startswith("### sample:") and "All calls gave the same tokens" in text
    assert "| fastest of 2 | 2 | on |" in text and "| fastest of 2 | 1 | off |" in text
    assert "× faster** on 2 threads, **" in text and "× faster** on 1 thread (" in text


def test_a_run_of_some_benchmarks_replaces_only_their_parts(tmp_path):
    started = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    load = (1.0, 2.0, 3.0)
    info = RunInfo("python -m pipeline.bench", started, 9.0, load, load, {"python": "3"})
    device = Device("cpu: a", "CPU: a", "cpu", 2, None)
    parts = ["### prepare: p\n\nold prepare", "### loss: l\n\nold loss\n\n#### sub\n\nx"]
    text = merge_benchmarks("", "cpu: a", render_section(device, info, parts))
    old = device_section(text, "cpu: a")
    new = replace_parts(old, ["### loss: l\n\nnew loss", "### sample: s\n\nnew"], "NOTE.")
    assert new.startswith(old.split("### ")[0]) and new.endswith("<!-- bench:end -->\n")
    assert "old prepare" in new and "old loss" not in new and "#### sub" not in new
    assert "### loss: l\n\nNOTE.\n\nnew loss\n\n### sample: s\n\nNOTE.\n\nnew\n<!--" in new
    # the command line: --only keeps the other parts and notes when the new one was measured
    out = tmp_path / "BENCHMARKS.md"
    main(["--quick", "--only", "memory", "--out", str(out)])
    first = out.read_text()
    main(["--quick", "--only", "sample", "--out", str(out)])
    text = out.read_text()
    assert "### memory" in text and "### sample" in text

    def memory(md: str) -> str:
        return md.split("### memory")[1].split("### sample")[0].split("<!-- bench:end")[0]

    assert memory(text).rstrip() == memory(first).rstrip()
    assert "Measured on its own: " in text.split("### sample")[1]
