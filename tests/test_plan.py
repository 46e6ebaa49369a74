"""Planning a run: the memory estimate against counts and CPU measurements, the micro-batch
search, wall time and cost, and the `python -m pipeline.plan` commands."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.env import process_env
from helpers.paths import REPO
from helpers.proc import run_module
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.errors import DataError
from pipeline.model import GPT, PRESETS, ModelConfig
from pipeline.tools.bench.fsdp_memory import bench_fsdp_memory
from pipeline.tools.cost import estimate_cost, measured_tokens_per_s
from pipeline.tools.memory_estimate import count_params, estimate_memory
from pipeline.tools.planning import batch_hint, main
from pipeline.tools.probe import cuda_step_fits, find_max_micro_batch, training_steps

GIB = 2**30
TINY = PRESETS["tiny"]
# Small enough to run forward and backward on CPU in a fraction of a second.
SMALL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
SMALL_VOCAB = dataclasses.replace(SMALL, vocab_size=64, padded_vocab_size=64)
WIDE_VOCAB = dataclasses.replace(SMALL, vocab_size=8192, padded_vocab_size=8192)


# --------------------------------------------------------------------------- measurements


def saved_tensor_bytes(model: GPT, tokens: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the backward in one
    forward pass of model on tokens (B, T + 1)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1], tokens[:, 1:])
    return sum(saved.values())


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages that operators created and that are still alive,
    checked after every operator (forward and backward), as a device allocator would count
    them without rounding. Storages that existed before (parameters, inputs) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: v for key, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self.live.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def training_peak_bytes(model: GPT, tokens: torch.Tensor, bf16: bool) -> int:
    """Peak live-tensor bytes of the second micro-step of a gradient accumulation (forward and
    backward, gradients already allocated), the logits (loss_impl full) held through the
    backward as the training loop holds them."""

    def micro_step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()  # logits (None when chunked) still referenced

    micro_step()  # allocates the gradients
    with LiveTensorPeak() as tracker:
        micro_step()
    return tracker.peak


def random_tokens(cfg: ModelConfig, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(
        0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)
    )


# --------------------------------------------------------------------------- estimate_memory


@pytest.mark.parametrize(
    "cfg",
    [*PRESETS.values(), dataclasses.replace(TINY, bias=False, padded_vocab_size=None)],
    ids=[*PRESETS, "tiny_nobias_unpadded"],
)
def test_state_bytes_follow_the_parameter_count(cfg):
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    est = estimate_memory(cfg, 4, cfg.block_size)
    assert est["parameters"] == 4 * n
    assert est["gradients"] == est["parameters"]
    assert est["optimizer"] == 2 * est["parameters"]
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_activations_scale_linearly_with_micro_batch_and_layers():
    cfg, block = PRESETS["gpt2"], 1024
    one, five = (estimate_memory(cfg, b, block)["activations"] for b in (1, 5))
    assert five == 5 * one
    by_layers = [
        estimate_memory(dataclasses.replace(cfg, n_layer=n), 2, block)["activations"]
        for n in (1, 2, 3, 6)
    ]
    per_layer = by_layers[1] - by_layers[0]
    assert by_layers[2] - by_layers[1] == per_layer
    assert by_layers[3] - by_layers[2] == 3 * per_layer
    # Korthikanti et al. 2022: 34·s·b·h bytes per layer with 16-bit activations.
    assert per_layer == 34 * block * 2 * cfg.n_embd


def test_fp32_doubles_activations():
    bf16, fp32 = (estimate_memory(TINY, 8, 256, precision=p) for p in ("bf16", "fp32"))
    assert fp32["activations"] == 2 * bf16["activations"]
    assert fp32["autocast_weights"] == 0 < bf16["autocast_weights"]


def test_sharding_divides_the_states_by_world_size():
    cfg = PRESETS["gpt2_xl"]
    alone = estimate_memory(cfg, 8, 1024)
    sharded = estimate_memory(cfg, 8, 1024, world_size=8, sharded=True)
    replicated = estimate_memory(cfg, 8, 1024, world_size=8, sharded=False)
    assert replicated == alone
    for key in ("parameters", "gradients", "optimizer"):
        assert sharded[key] == math.ceil(alone[key] / 8)
    assert sharded["activations"] == alone["activations"]
    assert sharded["logits"] == alone["logits"]
    # no autocast copies under FSDP: the root unit and two blocks all-gathered in bf16
    h, v = cfg.n_embd, cfg.embedding_rows
    root = v * h + cfg.block_size * h + 2 * h
    block = 12 * h * h + 13 * h  # 9h linear biases, two LayerNorms (gain and bias)
    assert count_params(cfg) == root + cfg.n_layer * block
    assert alone["gathered"] == sharded["autocast_weights"] == 0
    assert sharded["gathered"] == 2 * (root + 2 * block)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_the_sharded_estimate_is_within_20_percent_of_a_measured_fsdp_step(precision):
    """Two gloo processes run the training step of FSDP2 (the MixedPrecisionPolicy with bf16)
    with two micro-batches of gradient accumulation under torch's FSDPMemTracker, which follows
    every tensor the step allocates; the estimate for the same run is within 20% of the peak.
    `python -m pipeline.bench --only fsdp-memory` runs the same for GPT-2 124M and 350M."""
    (result,) = bench_fsdp_memory([("tiny", 4, 128, precision, "adamw")])
    assert result.measured > 0 and 0.8 <= result.ratio <= 1.2, result
    # gradient accumulation held no unsharded gradients: only their shards persist
    assert result.kinds["sharded_grad"] > 0 and result.kinds["unsharded_grad"] == 0, result


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision="fp16"), "precision"),
        (dict(block_size=TINY.block_size + 1), "block_size"),
        (dict(micro_batch_size=0), "micro_batch_size"),
    ],
)
def test_estimate_rejects_bad_arguments(kwargs, message):
    args = dict(model=TINY, micro_batch_size=2, block_size=128) | kwargs
    with pytest.raises(ValueError, match=message):
        estimate_memory(**args)


def test_activation_estimate_matches_the_tensors_autograd_saves():
    """fp32 on CPU, vocabulary of 64 so that the blocks dominate: the growth of the saved bytes
    from 2 to 4 sequences against the growth of the activation estimate."""
    torch.manual_seed(0)
    model, seq = GPT(SMALL_VOCAB), 64
    measured = [saved_tensor_bytes(model, random_tokens(SMALL_VOCAB, b, seq)) for b in (2, 4)]
    estimated = [estimate_memory(SMALL_VOCAB, b, seq, "fp32")["activations"] for b in (2, 4)]
    ratio = (measured[1] - measured[0]) / (estimated[1] - estimated[0])
    assert 0.8 <= ratio <= 1.25, (measured, estimated)


@pytest.mark.parametrize("loss_impl", ["full", "chunked"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_and_logit_estimate_matches_measured_peak(precision, loss_impl):
    """Vocabulary of 8,192 rows, so the logits and their gradients dominate: the growth of
    the peak live-tensor bytes of forward + backward from 2 to 4 sequences against the growth
    of the estimated activations + logits, for the full and the chunked loss."""
    torch.manual_seed(0)
    model, seq = GPT(WIDE_VOCAB), 32
    model.loss_impl = loss_impl
    measured = [
        training_peak_bytes(model, random_tokens(WIDE_VOCAB, b, seq), precision == "bf16")
        for b in (2, 4)
    ]
    estimates = [
        estimate_memory(WIDE_VOCAB, b, seq, precision, loss_impl=loss_impl) for b in (2, 4)
    ]
    estimated = [e["activations"] + e["logits"] for e in estimates]
    ratio = (measured[1] - measured[0]) / (estimated[1] - estimated[0])
    assert 0.75 <= ratio <= 1.33, (measured, estimated)


def test_the_chunked_loss_keeps_the_peak_below_the_full_logits_and_as_estimated():
    """GPT-2's vocabulary at 8 x 256 positions, fp32 (tiny model): the measured peak of a
    micro-step drops by about what the estimate says once the (B, T, V) logits are gone."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, n_layer=1)
    model, tokens = GPT(cfg), random_tokens(cfg, 8, 256)
    peaks = {}
    for impl in ("full", "chunked"):
        model.loss_impl = impl
        peaks[impl] = training_peak_bytes(model, tokens, bf16=False)
    est = {
        i: estimate_memory(cfg, 8, 256, "fp32", loss_impl=i, device_type="cpu")
        for i in ("full", "chunked")
    }
    assert peaks["chunked"] < 0.4 * peaks["full"]
    saved, estimated = (
        peaks["full"] - peaks["chunked"],
        est["full"]["logits"] - est["chunked"]["logits"],
    )
    assert 0.75 <= saved / estimated <= 1.33, (peaks, est)


def test_muon_holds_one_buffer_per_block_matrix():
    cfg = PRESETS["gpt2"]
    adamw, muon = (
        estimate_memory(cfg, 8, 1024, optimizer=o)["optimizer"] for o in ("adamw", "muon")
    )
    assert adamw - muon == 4 * 12 * cfg.n_layer * cfg.n_embd**2


# --------------------------------------------------------------------------- micro-batch search


class Counted:
    """A predicate that counts its calls."""

    def __init__(self, predicate):
        self.predicate, self.calls = predicate, 0

    def __call__(self, b: int) -> bool:
        self.calls += 1
        return self.predicate(b)


def fits_budget(budget: int):
    return lambda b: estimate_memory(TINY, b, 256)["total"] <= budget


@pytest.mark.parametrize("low, high", [(1, 1024), (1, 1000), (5, 300)])
@pytest.mark.parametrize("target", [1, 2, 3, 37, 64, 299, 300, 511, 999, 1000])
def test_search_finds_the_largest_fitting_size_in_few_calls(low, high, target):
    budget = estimate_memory(TINY, target, 256)["total"] + 1
    expected = max((b for b in range(low, high + 1) if fits_budget(budget)(b)), default=0)
    try_step = Counted(fits_budget(budget))
    assert find_max_micro_batch(try_step, low, high) == expected
    assert try_step.calls <= 2 * math.ceil(math.log2(high)) + 1


@pytest.mark.parametrize("start", [1, 16, 64, 1024])
@pytest.mark.parametrize("target", [1, 37, 64, 65, 1000])
def test_search_from_the_estimate_finds_the_same_size(start, target):
    budget = estimate_memory(TINY, target, 256)["total"] + 1
    try_step = Counted(fits_budget(budget))
    assert find_max_micro_batch(try_step, 1, 1024, start=start) == target
    # from a start within a factor of two of the answer: a handful of tries
    if start <= target < 2 * start:
        assert try_step.calls <= 2 + math.ceil(math.log2(start))


def test_search_returns_zero_when_nothing_fits_and_high_when_everything_does():
    nothing = Counted(fits_budget(estimate_memory(TINY, 1, 256)["total"] - 1))
    assert find_max_micro_batch(nothing, 1, 1024) == 0
    assert nothing.calls == 1
    assert find_max_micro_batch(fits_budget(10**15), 1, 100) == 100
    assert find_max_micro_batch(fits_budget(10**15), 7, 7) == 7
    with pytest.raises(ValueError, match="low"):
        find_max_micro_batch(fits_budget(10**15), 0, 8)


def test_batch_hint_names_a_valid_override():
    tokens_per_step, block, gpus = 524_288, 1024, 8
    hint = batch_hint(48, block, gpus, tokens_per_step)
    divides = [m for m in range(1, 48) if tokens_per_step % (m * block * gpus) == 0]
    assert f"trainer.micro_batch_size={max(divides)}" in hint
    assert f"trainer.tokens_per_step={48 * block * gpus}" in hint
    accum = tokens_per_step // (32 * block * gpus)
    assert batch_hint(32, block, gpus, tokens_per_step).endswith(f"grad_accum_steps {accum}")


def test_cuda_step_fits_refuses_other_devices():
    with pytest.raises(ValueError, match="CUDA"):
        cuda_step_fits(TINY, 1, 32, "fp32", False, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_fits_measures_and_recovers_from_out_of_memory():
    device = torch.device("cuda")
    peaks: dict[int, int] = {}
    assert cuda_step_fits(TINY, 8, 256, "bf16", False, device, peaks=peaks)
    estimate = estimate_memory(TINY, 8, 256)["total"]
    assert 0.5 <= peaks[8] / estimate <= 2.0, (peaks, estimate)
    before = torch.cuda.memory_allocated(device)
    assert not cuda_step_fits(TINY, 1 << 16, 256, "bf16", False, device, peaks=peaks)
    assert torch.cuda.memory_allocated(device) == before
    assert 1 << 16 not in peaks


# --------------------------------------------------------------------------- time and cost


def test_cost_arithmetic():
    cost = estimate_cost(int(10e9), 500_000.0, 8, 2.5)
    assert cost["wall_s"] == pytest.approx(10e9 / 500_000)  # 20,000 s
    assert cost["wall_h"] == pytest.approx(10e9 / 500_000 / 3600)
    assert cost["gpu_hours"] == pytest.approx(8 * cost["wall_h"])
    assert cost["cost"] == pytest.approx(2.5 * 8 * 10e9 / 500_000 / 3600)
    with pytest.raises(ValueError, match="tokens_per_s"):
        estimate_cost(int(10e9), 0.0, 8, 2.5)


def write_metrics(path: Path, step_times: list[float], tokens_per_step: int = 524_288) -> None:
    """metrics.jsonl as Reporter.train_step and Reporter.val_step write it."""
    lines = []
    for step, dt in enumerate(step_times, start=1):
        train = {
            "kind": "train",
            "step": step,
            "loss": 5.0,
            "lr": 6e-4,
            "grad_norm": 1.0,
            "tokens_per_s": tokens_per_step / dt,
            "mfu": None,
            "step_time_s": dt,
            "tokens_seen": step * tokens_per_step,
        }
        lines.append(json.dumps(train))
        if step % 4 == 0:
            val = {
                "kind": "val",
                "step": step,
                "loss": 5.1,
                "perplexity": math.exp(5.1),
                "tokens_seen": step * tokens_per_step,
            }
            lines.append(json.dumps(val))
    path.write_text("".join(line + "\n" for line in lines))


def test_measured_tokens_per_s_is_the_median_after_warmup(tmp_path):
    step_times = [30.0, 9.0, 4.0] + [1.0 + 0.1 * (i % 5) for i in range(12)]
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, step_times)
    expected = statistics.median(524_288 / dt for dt in step_times[3:])
    assert measured_tokens_per_s(path, skip_first=3) == pytest.approx(expected)
    with pytest.raises(DataError, match="skip_first"):
        measured_tokens_per_s(path, skip_first=len(step_times))
    with pytest.raises(DataError, match="not found"):
        measured_tokens_per_s(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- command line


def run_plan(*args: str) -> str:
    done = run_module("plan", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def table_rows(text: str) -> dict[int, dict[str, float]]:
    """The rows of the memory table, keyed by micro-batch size: {column: GiB}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| micro_batch_size |"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        size, *cells = (c.strip() for c in line.strip("|").split("|"))
        rows[int(size)] = dict(zip(columns, map(float, cells)))
    return rows


def test_memory_command_prints_the_estimate_table():
    cfg = PRESETS["gpt2_large"]
    out = run_plan(
        "memory",
        "--model",
        "gpt2_large",
        "--block-size",
        "1024",
        "--micro-batch-size",
        "8",
        "16",
        "--world-size",
        "8",
        "--sharded",
    )
    rows = table_rows(out)
    assert sorted(rows) == [8, 16]
    for b, row in rows.items():
        est = estimate_memory(cfg, b, 1024, world_size=8, sharded=True)
        assert row == {k: pytest.approx(v / GIB, abs=0.006) for k, v in est.items()}


def test_memory_command_gives_the_micro_batch_for_common_gpus():
    out = run_plan(
        "memory", "--model", "gpt2_medium", "--optimizer", "muon", "--micro-batch-size", "8"
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("largest power-of-two"))
    fits = dict(cell.split(" GB: ") for cell in line.split("): ")[1].split(" | "))
    cfg = PRESETS["gpt2_medium"]
    for gb, b in fits.items():
        usable = 0.9 * (int(gb) - 1) * GIB
        b = int(b)
        assert estimate_memory(cfg, b, 1024, optimizer="muon")["total"] <= usable
        assert estimate_memory(cfg, 2 * b, 1024, optimizer="muon")["total"] > usable
    assert int(fits["24"]) < int(fits["80"])


def test_cost_command_prints_wall_time_and_cost(tmp_path, capsys):
    out = run_plan(
        "cost", "--tokens", "10e9", "--tokens-per-s", "500000", "--gpus", "8", "--price", "2.5"
    )
    hours = 10e9 / 500_000 / 3600
    assert "20,000 s" in out and f"{hours:,.2f} h" in out
    assert f"= {8 * hours * 2.5:,.2f}" in out
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [2.0] * 12 + [1.0] * 20)
    main(["cost", "--tokens", "1e9", "--metrics", str(path), "--gpus", "1", "--price", "3"])
    rate = 524_288 / 1.0
    assert f"{1e9 / rate:,.0f} s" in capsys.readouterr().out
    with pytest.raises(DataError, match="skip_first"):
        main(
            [
                "cost",
                "--tokens",
                "1e9",
                "--metrics",
                str(path),
                "--skip-first",
                "40",
                "--gpus",
                "1",
                "--price",
                "3",
            ]
        )


def test_max_batch_command_falls_back_to_the_estimate():
    memory_gib = 0.5
    out = run_plan("max-batch", "--model", "tiny", "--estimate", "--memory-gib", str(memory_gib))
    powers = [2**k for k in range(11)]
    expected = max(b for b in powers if estimate_memory(TINY, b, 256)["total"] <= memory_gib * GIB)
    assert "estimate" in out
    assert f"trainer.micro_batch_size={expected}\n" in out
    assert "tokens_per_step must be a multiple of" in out


def test_user_errors_exit_2_with_one_line():
    done = run_module("plan", "memory", "--model", "nope")
    assert done.returncode == 2
    assert done.stderr == "error: invalid configuration: unknown model 'nope': use one of " + (
        ", ".join(PRESETS) + "\n"
    )


def test_the_memory_probe_runs_the_training_step(tmp_path):
    """The probe's steps are the training loop's TrainStep: on the CPU (fp32, no compile) two
    steps of two micro-batches of a small GPT-2 give a finite loss near ln(vocab_size)."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
    result = training_steps(cfg, 2, 16, "fp32", False, torch.device("cpu"))
    assert result.finite and not result.stopping
    assert abs(result.loss - math.log(cfg.vocab_size)) < 0.5 and result.grad_norm > 0


PROBE_CODE = """
import json, sys
import torch
from torch.nn.parallel import DistributedDataParallel
from pipeline.config.cli import compose_train
from pipeline.tools.probe import RunProbe
cfg = compose_train(json.loads(sys.argv[1]))
probe = RunProbe.build(cfg, data_parallel=sys.argv[2] == "ddp")
fits = [probe.fits(b) for b in (2, 3)]
print(json.dumps({
    "fits": fits,
    "checkpointing": probe.model.activation_checkpointing,
    "loss_impl": probe.model.loss_impl,
    "fsdp": type(probe.model).__name__ != "GPT",
    "ddp": isinstance(probe.wrapped, DistributedDataParallel),
    "compiled": probe.compiled,
    "momentum": sum(len(s) for s in probe.step.optimizer.optimizers[-1].state.values()),
}))
"""


@pytest.mark.parametrize("layout", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_the_run_probe_builds_the_runs_training_step(layout):
    """max-batch's probe takes the run's settings: a tiny recipe with activation checkpointing
    and the full loss, wrapped in DDP (its gradient buckets) or sharded with FSDP, runs real
    optimizer steps at two sizes with the same model and optimizer (AdamW's state persists)."""
    overrides = [
        "model=tiny",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=64",
        "runtime.cpu=true",
        "runtime.compile=false",
        "runtime.activation_checkpointing=true",
        "runtime.loss_impl=full",
        f"runtime.fsdp={str(layout == 'fsdp').lower()}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", PROBE_CODE, json.dumps(overrides), layout],
        cwd=REPO,
        env=process_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fits"] == [True, True]
    assert result["checkpointing"] is True and result["loss_impl"] == "full"
    assert result["fsdp"] is (layout == "fsdp") and result["ddp"] is (layout == "ddp")
    assert result["compiled"] is False and result["momentum"] > 0
