"""What only a CUDA device can show (`make test-gpu`, `pytest -m gpu`): the training step waits
for the device once, the chunked loss equals the full logits in float32 and bf16, the compiled
bf16 step equals the eager one, attention takes a flash or cuDNN kernel, fused AdamW and Muon
step, the KV cache samples the same tokens, max-batch's probe recovers from running out of
memory; and, with two GPUs or more, DDP over NCCL and FSDP2 follow one process and Muon split
over the GPUs equals every GPU running it. Skipped without CUDA; the CPU halves of these checks
are in the default suite (test_host_syncs, test_model, test_distributed, test_plan)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.paths import REPO
from helpers.runs import records
from helpers.tiny import tiny_run, train_config

from pipeline.config import OptimConfig
from pipeline.model import GPT, PRESETS, ModelConfig
from pipeline.training.loop import setup
from pipeline.training.optim import build_optimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMALL = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=256)


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (b, t + 1), generator=g).cuda()


def test_one_wait_per_step_on_cuda(sample_shards, tmp_path):
    """torch's sync debug mode warns at every synchronising call: one per step (the report)."""
    cfg = train_config(
        tiny_run(
            sample_shards,
            tmp_path,
            "run",
            "runtime.cpu=false",
            "trainer.max_steps=5",
            "eval.tokens=0",
            "checkpoint.interval=0",
        )
    )
    with contextlib.ExitStack() as held:
        run = setup(cfg, held)
        run.step(1, 1.0, run.loader.next_batch, lambda: False, run.loader.prefetch)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(2, 5):
                    run.step(step, 1.0, run.loader.next_batch, lambda: False, run.loader.prefetch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 3, [str(w.message) for w in syncs]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_loss_equals_the_full_logits_on_cuda(precision, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = GPT(SMALL).cuda()
    batch = tokens(8, 256)
    results = {}
    for impl in ("full", "chunked"):
        model.zero_grad(set_to_none=True)
        model.loss_impl = impl
        autocast = (
            torch.autocast("cuda", torch.bfloat16)
            if precision == "bf16"
            else (contextlib.nullcontext())
        )
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        results[impl] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    tol = 1e-5 if precision == "fp32" else 2e-3
    assert results["chunked"][0] == pytest.approx(results["full"][0], rel=tol)
    for name, g in results["full"][1].items():
        assert (results["chunked"][1][name] - g).norm() / g.norm() < 10 * tol, name


def test_compiled_bf16_step_equals_the_eager_step():
    torch.manual_seed(0)
    model = GPT(PRESETS["gpt2"]).cuda()
    batch = tokens(4, 1024)
    losses = []
    for forward in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = forward(batch[:, :-1], batch[:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        losses.append((loss.item(), norm.item()))
    (eager, eager_norm), (compiled, compiled_norm) = losses
    assert compiled == pytest.approx(eager, rel=1e-2)
    assert compiled_norm == pytest.approx(eager_norm, rel=5e-2)


def test_attention_takes_a_flash_or_cudnn_kernel_for_gpt2_shapes():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(4, 12, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.isfinite().all()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_fused_adamw_and_muon_steps_move_the_weights(name):
    torch.manual_seed(0)
    model = GPT(SMALL).cuda()
    optimizers = build_optimizer(model, OptimConfig(name=name), "cuda")
    assert optimizers.raw[-1].defaults["fused"] is True  # AdamW's fused CUDA kernel
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = tokens(4, 256)
    with torch.autocast("cuda", torch.bfloat16):
        _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    optimizers.step()
    for n, p in model.named_parameters():
        assert p.isfinite().all() and not torch.equal(p, before[n]), n


def test_kv_cache_samples_the_same_tokens_on_cuda():
    torch.manual_seed(0)
    model = GPT(SMALL).cuda().eval()
    prompt = tokens(2, 16)[:, :16]
    with torch.autocast("cuda", torch.bfloat16):
        cached = model.generate(prompt, 32, temperature=0)
        full = model.generate(prompt, 32, temperature=0, use_cache=False)
    assert torch.equal(cached, full)


def two_gpu_run(sample_shards, runs, name: str, *extra: str) -> None:
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable}
    args = tiny_run(
        sample_shards,
        runs,
        name,
        "runtime.cpu=false",
        "trainer.max_steps=4",
        "eval.tokens=2048",
        "trainer.seed=11",
        *extra,
    )
    done = subprocess.run(
        ["bash", "launch/train_single_node.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("extra", [[], ["runtime.fsdp=true"]], ids=["ddp", "fsdp"])
def test_two_gpus_follow_one(sample_shards, tmp_path, extra):
    """DDP over NCCL and FSDP2 on two GPUs against one GPU, fp32 without TF32 differences
    mattering at this tolerance."""
    from pipeline.training.loop import train

    settings = [
        "runtime.cpu=false",
        "trainer.max_steps=4",
        "eval.tokens=2048",
        "trainer.seed=11",
        "runtime.precision=fp32",
        "runtime.compile=false",
    ]
    train(train_config(tiny_run(sample_shards, tmp_path, "one", *settings)))
    two_gpu_run(
        sample_shards, tmp_path, "two", "runtime.precision=fp32", "runtime.compile=false", *extra
    )
    one, two = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_muon_split_over_two_gpus_equals_every_gpu_running_it(sample_shards, tmp_path):
    """ZeroRedundancyOptimizer's broadcasts over NCCL: the weights of optim.muon_sharded=true
    equal, bit for bit, those of every GPU running Muon on every matrix."""
    from helpers.runs import final_weights

    for name, sharded in (("split", "true"), ("whole", "false")):
        two_gpu_run(
            sample_shards,
            tmp_path,
            name,
            "optim=muon",
            "runtime.compile=false",
            f"optim.muon_sharded={sharded}",
        )
    split, whole = final_weights(tmp_path / "split"), final_weights(tmp_path / "whole")
    assert all(torch.equal(split[k], whole[k]) for k in whole)


PROBE_CODE = """
import json
from pipeline.config.cli import compose_train
from pipeline.tools.probe import RunProbe
cfg = compose_train(["model=tiny", "model.n_layer=2", "model.n_embd=256", "model.n_head=4",
                     "model.block_size=256", "runtime.compile=false"])
probe = RunProbe.build(cfg, data_parallel=True)
peaks = {}
print(json.dumps({"fits": [probe.fits(8, peaks), probe.fits(1 << 16), probe.fits(8, peaks)],
                  "peak": peaks[8]}))
"""


def test_the_run_probe_recovers_from_out_of_memory():
    """max-batch's probe: a size that runs out of CUDA memory is answered False, and the same
    model and optimizer then train a size that fits (DDP's buckets included)."""
    import json

    done = subprocess.run(
        [sys.executable, "-c", PROBE_CODE], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["fits"] == [True, False, True] and result["peak"] > 0
