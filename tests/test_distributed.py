"""Two real processes over gloo, started by the launch script, against one process doing the
same work."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO
from helpers.proc import run_module
from helpers.runs import final_weights, optimizer_state, records
from helpers.tiny import tiny_run, train_config

from pipeline.errors import USER_ERROR
from pipeline.training.checkpoint.folder import RNG, list_checkpoints
from pipeline.training.checkpoint.tensors import saved_state
from pipeline.training.loop import train
from pipeline.training.rng import set_rng_state


def overrides(shard_dir: Path, runs_dir: Path, run_name: str) -> list[str]:
    """A 2-layer model on 64-token windows; 512 tokens per step = 2 micro-batches of 4, which is
    one micro-batch on each of 2 processes or two accumulation steps on 1."""
    return tiny_run(
        shard_dir,
        runs_dir,
        run_name,
        "trainer.max_steps=4",
        "eval.interval=2",
        "eval.tokens=2048",
        "checkpoint.interval=2",
        "trainer.seed=11",
    )


def launch_two_processes(args: list[str]) -> str:
    """`launch/train_single_node.sh` with NPROC=2: accelerate's multi-GPU launcher (torchrun),
    which on a machine without GPUs runs CPU processes over gloo."""
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "launch/train_single_node.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# Weights of two runs that differ only in summation order (two half-batch gradients averaged
# across ranks, or one accumulated): AdamW divides by sqrt(v), so on embedding rows that see
# a token once or twice the rounding of a ~1e-9 gradient moves the update by up to ~1e-5 of
# max_lr 1e-2 per step (2.3e-5 measured on an Intel Xeon). ATOL is 1% of one step at max_lr:
# far below what a wrong shard, average or step would move. AdamW hides a gradient scaled by a
# constant, which the grad norm of every step (compared to 1e-3: FSDP's step 3 differs by
# 3.6e-4, after its weights drifted as above) does not.
WEIGHT_ATOL = 1e-4


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
        if "grad_norm" in y:  # train records
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), (x, y)


@pytest.fixture(scope="module")
def single(sample_shards, tmp_path_factory) -> Path:
    """The uninterrupted one-process run."""
    runs = tmp_path_factory.mktemp("single")
    train(train_config(overrides(sample_shards, runs, "one")))
    return runs / "one"


@pytest.fixture(scope="module")
def double(sample_shards, tmp_path_factory) -> tuple[Path, str]:
    """The same run on two processes."""
    runs = tmp_path_factory.mktemp("double")
    out = launch_two_processes(overrides(sample_shards, runs, "two"))
    return runs / "two", out


def test_two_processes_follow_the_one_process_run(single, double):
    run_dir, out = double
    # Each rank read a disjoint half of every batch: together the same samples as one process.
    assert_same_losses(records(run_dir, "train"), records(single, "train"))
    # Validation is sharded across ranks and reduced to the same mean.
    assert_same_losses(records(run_dir, "val"), records(single, "val"))
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["replicas_agree"] is True
    # Only rank 0 prints: one header, one line per step.
    assert out.count("2 process(es)") == 1 and out.count("step 4/4 | loss") == 1
    two, one = final_weights(run_dir), final_weights(single)
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=WEIGHT_ATOL, msg=name)


def test_two_process_checkpoint_resumes_on_one_process(sample_shards, single, double, tmp_path):
    run_dir = tmp_path / "two"
    shutil.copytree(double[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    summary = train(train_config(overrides(sample_shards, tmp_path, "two")))
    assert summary["steps"] == 4
    assert_same_losses(records(run_dir, "train"), records(single, "train"))
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["world_size"] == 1 and state["loader"]["position"] == 4 * 8


@pytest.fixture(scope="module")
def sharded(sample_shards, tmp_path_factory) -> Path:
    """The same run on two processes with FSDP full sharding and activation checkpointing."""
    runs = tmp_path_factory.mktemp("fsdp")
    args = overrides(sample_shards, runs, "fsdp")
    launch_two_processes(args + ["runtime.fsdp=true", "runtime.activation_checkpointing=true"])
    return runs / "fsdp"


def test_fsdp_follows_the_one_process_run(single, sharded):
    assert_same_losses(records(sharded, "train"), records(single, "train"))
    assert_same_losses(records(sharded, "val"), records(single, "val"))
    state = json.loads((list_checkpoints(sharded)[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["replicas_agree"] is None
    # the checkpoint holds whole, unprefixed tensors, as a one-process checkpoint does
    full, one = final_weights(sharded), final_weights(single)
    assert full.keys() == one.keys()
    for name in one:
        assert full[name].shape == one[name].shape
        torch.testing.assert_close(full[name], one[name], rtol=1e-4, atol=WEIGHT_ATOL, msg=name)


def test_fsdp_checkpoint_resumes_on_one_process(sample_shards, single, sharded, tmp_path):
    run_dir = tmp_path / "fsdp"
    shutil.copytree(sharded, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    train(train_config(overrides(sample_shards, tmp_path, "fsdp")))
    assert_same_losses(records(run_dir, "train"), records(single, "train"))


@pytest.mark.slow
def test_fsdp_in_bf16_compiled_per_block_follows_the_one_process_run(
    sample_shards, single, tmp_path
):
    """FSDP2 as torchtitan applies it: each block checkpointed, compiled (Inductor on the CPU),
    then sharded with MixedPrecisionPolicy(bf16 parameters, fp32 reduction), no autocast. The
    losses follow the float32 one-process run within bf16's rounding; the checkpoint holds the
    float32 shards gathered into whole tensors, which resume on one process."""
    args = overrides(sample_shards, tmp_path, "bf16")
    out = launch_two_processes(
        args
        + [
            "runtime.fsdp=true",
            "runtime.precision=bf16",
            "runtime.compile=true",
            "runtime.activation_checkpointing=true",
        ]
    )
    assert "precision bf16 | compile True" in out and "FSDP full shard" in out
    run_dir = tmp_path / "bf16"
    two, one = records(run_dir, "train"), records(single, "train")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for x, y in zip(two, one):  # bf16 rounds to 3 significant digits
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-2), (x, y)
    weights = final_weights(run_dir)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    resumed = run_module("train", *args, "runtime.precision=bf16")  # autocast, one process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]


def test_fsdp_gathers_bf16_and_keeps_float32_shards():
    """In one process: during a block's forward its parameters are the gathered bf16 copies;
    outside it they are float32 shards, and so are the gradients the optimizer reads."""
    from torch import distributed as dist

    from pipeline.model import GPT, ModelConfig
    from pipeline.training.runtime import shard

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = GPT(
        ModelConfig(
            n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, padded_vocab_size=64
        )
    )
    shard(model, "bf16")
    seen = []
    model.transformer.h[1].attn.c_attn.register_forward_hook(
        lambda linear, args, out: seen.append((linear.weight.dtype, out.dtype))
    )
    tokens = torch.randint(0, 64, (2, 17))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] and loss.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_each_rank_keeps_its_own_random_stream(double):
    """Ranks draw from trainer.seed + rank after the (shared) initialisation; the checkpoint
    records every rank's states, and each rank restores its own."""
    rng = torch.load(list_checkpoints(double[0])[-1] / RNG, weights_only=True)
    assert len(rng["other_ranks"]) == 1
    rank0, rank1 = rng["torch"], rng["other_ranks"][0]["torch"]
    assert not torch.equal(rank0, rank1)
    draws = []
    for rank in (0, 1):
        set_rng_state(rng, rank)
        draws.append(torch.rand(4))
    torch.set_rng_state(rank1)
    assert torch.equal(draws[1], torch.rand(4)) and not torch.equal(draws[0], draws[1])
    # a rank the checkpoint has no states for (resumed on more processes): rank 0's states,
    # then a seed of its own, different from every other rank's
    set_rng_state(rng, 2)
    third = torch.rand(4)
    set_rng_state(rng, 2)
    assert torch.equal(third, torch.rand(4))
    assert not any(torch.equal(third, d) for d in draws)


# --------------------------------------------------------------------------- Muon split by rank


@pytest.fixture(scope="module")
def muon_single(sample_shards, tmp_path_factory) -> Path:
    """The one-process run with optim=muon (Muon on the block matrices, AdamW on the rest)."""
    runs = tmp_path_factory.mktemp("muon_single")
    train(train_config(overrides(sample_shards, runs, "one") + ["optim=muon"]))
    return runs / "one"


@pytest.fixture(scope="module")
def muon_double(sample_shards, tmp_path_factory) -> Path:
    """The same run on two processes: Muon inside ZeroRedundancyOptimizer (the default,
    optim.muon_sharded=true), each block matrix's update computed on one rank and broadcast."""
    runs = tmp_path_factory.mktemp("muon_double")
    launch_two_processes(overrides(sample_shards, runs, "two") + ["optim=muon"])
    return runs / "two"


def same_bits(a, b) -> bool:
    """Nested states equal, tensors bit for bit (dict key order aside, and tuple or list: a
    resumed AdamW holds its betas as the list the checkpoint gave it)."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_bits, a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def assert_same_bits(a: Path, b: Path) -> None:
    """Two checkpoints hold the same weights and optimizer states, bit for bit."""
    assert same_bits(saved_state(a), saved_state(b)), a


def test_muon_split_over_two_processes_equals_every_rank_running_it(
    sample_shards, muon_single, muon_double, tmp_path
):
    # Every rank running Muon on every matrix: the same weights and momentum, bit for bit.
    launch_two_processes(
        overrides(sample_shards, tmp_path, "two") + ["optim=muon", "optim.muon_sharded=false"]
    )
    for split, whole in zip(list_checkpoints(muon_double), list_checkpoints(tmp_path / "two")):
        assert_same_bits(split, whole)
    assert records(muon_double, "train") == records(tmp_path / "two", "train")
    state = json.loads((list_checkpoints(muon_double)[-1] / "state.json").read_text())
    assert state["replicas_agree"] is True  # every rank received every updated matrix
    # Against one process: the losses as for AdamW. (The weights move further apart than
    # AdamW's, also with muon_sharded=false: Newton–Schulz maps the gradient's smallest
    # singular directions to size 1, so the rounding of two half-batch gradients averaged,
    # against one accumulated, moves Muon's update by ~5% of a step, 1e-3 at muon_lr 0.02.)
    assert_same_losses(records(muon_double, "train"), records(muon_single, "train"))
    assert_same_losses(records(muon_double, "val"), records(muon_single, "val"))
    # The checkpoint holds every matrix's momentum, gathered from both ranks, in the layout a
    # one-process run writes: the same names, groups and settings.
    split, one = (optimizer_state(list_checkpoints(r)[-1]) for r in (muon_double, muon_single))
    assert split["state"].keys() == one["state"].keys()
    assert sum("momentum_buffer" in s for s in split["state"].values()) == 2 * 4  # 2 layers
    assert [g.keys() for g in split["param_groups"]] == [g.keys() for g in one["param_groups"]]
    assert [g["params"] for g in split["param_groups"]] == [
        g["params"] for g in one["param_groups"]
    ]


def test_muon_split_checkpoint_resumes_on_one_process(
    sample_shards, muon_single, muon_double, tmp_path
):
    run_dir = tmp_path / "two"
    shutil.copytree(muon_double, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    train(train_config(overrides(sample_shards, tmp_path, "two") + ["optim=muon"]))
    assert_same_losses(records(run_dir, "train"), records(muon_single, "train"))
    resumed = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert resumed["world_size"] == 1


@pytest.mark.slow
def test_muon_checkpoints_resume_on_two_processes(
    sample_shards, muon_single, muon_double, tmp_path
):
    """Each rank loads its matrices' momentum: a 2-process checkpoint continues on 2 processes
    bit for bit as the uninterrupted run, and a 1-process one continues as the 1-process run."""
    for source, name in ((muon_double, "two"), (muon_single, "one")):
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
        launch_two_processes(overrides(sample_shards, tmp_path, name) + ["optim=muon"])
        assert_same_losses(records(run_dir, "train"), records(muon_single, "train"))
        final = list_checkpoints(run_dir)[-1]
        assert json.loads((final / "state.json").read_text())["world_size"] == 2
    assert_same_bits(list_checkpoints(tmp_path / "two")[-1], list_checkpoints(muon_double)[-1])


# --------------------------------------------------------------------------- several nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(
    args: list[list[str]], timeout: float = 240
) -> list[subprocess.CompletedProcess]:
    """`launch/train_multi_node.sh` as two "nodes" of one CPU process each on 127.0.0.1 (gloo),
    node i with the overrides args[i]; both run to their end (or the test fails at `timeout`
    seconds: a hang)."""
    port = str(free_port())
    procs = []
    for rank, node_args in enumerate(args):
        env = {
            **os.environ,
            "MAIN_ADDR": "127.0.0.1",
            "MAIN_PORT": port,
            "NNODES": "2",
            "NODE_RANK": str(rank),
            "GPUS_PER_NODE": "1",
            "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                ["bash", "launch/train_multi_node.sh", *node_args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_two_nodes_resume_from_the_mirror_and_follow_one_process(
    sample_shards, single, double, tmp_path
):
    """The multi-node launcher for real, on new machines: runs/ is empty and the 2-process
    run's step 2 is in its checkpoint mirror. Node 0 pulls it into runs/ (storage both nodes
    read), both resume from it (node 1 checks that it reads the one node 0 chose) and end as
    the one-process run."""
    run_dir, mirror = tmp_path / "two", tmp_path / "mirror"
    shutil.copytree(
        double[0] / "checkpoints" / "step_0000002", mirror / "checkpoints" / "two" / "step_0000002"
    )
    args = overrides(sample_shards, tmp_path, "two") + [f"checkpoint.mirror={mirror}"]
    nodes = launch_two_nodes([args, args])
    assert [n.returncode for n in nodes] == [0, 0], (
        nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    )
    assert f"pulled checkpoint {mirror}/checkpoints/two/step_0000002" in nodes[0].stdout
    assert f"resuming from {run_dir / 'checkpoints' / 'step_0000002'}" in nodes[0].stdout
    assert (mirror / "checkpoints" / "two" / "step_0000004" / "state.json").is_file()
    after = [r for r in records(single, "train") if r["step"] > 2]  # metrics.jsonl: new machine
    assert_same_losses(records(run_dir, "train"), after)
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["replicas_agree"] is True


def test_nodes_that_see_different_run_folders_stop_at_once_with_one_line(
    sample_shards, double, tmp_path
):
    """Node-local disks: node 0's runs/ holds the run's checkpoints, node 1's is empty. Before,
    node 0 resumed while node 1 started at step 0, and the job hung. Now both stop, exit 2,
    and node 1 says which checkpoint it cannot read and what to do."""
    shutil.copytree(double[0], tmp_path / "node0" / "two")
    (tmp_path / "node1").mkdir()
    args = [overrides(sample_shards, tmp_path / f"node{i}", "two") for i in (0, 1)]
    started = time.monotonic()
    nodes = launch_two_nodes(args, timeout=180)
    assert time.monotonic() - started < 120
    assert [n.returncode for n in nodes] == [USER_ERROR, USER_ERROR]
    lines = [[ln for ln in n.stderr.splitlines() if ln.startswith("error: ")] for n in nodes]
    assert len(lines[1]) == 1 and lines[1][0].startswith("error: node 1 (")
    assert "cannot read checkpoints/step_0000004, the checkpoint the main process" in lines[1][0]
    assert "on storage every node reads" in lines[1][0]
    assert lines[0] == [lines[1][0]]  # node 0 stops with node 1's line
    assert len(list_checkpoints(tmp_path / "node0" / "two")) == 2  # nothing lost or written
