"""Learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.config import OptimConfig
from pipeline.model import GPT, ModelConfig
from pipeline.training.optim import build_optimizer, lr_at

CFG = OptimConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=10)


def test_warmup_is_linear_up_to_max_lr():
    assert lr_at(0, CFG, 100) == pytest.approx(6e-4 / 10)
    assert lr_at(4, CFG, 100) == pytest.approx(6e-4 * 5 / 10)
    assert lr_at(9, CFG, 100) == pytest.approx(6e-4)


def test_cosine_decay_from_peak_to_min_lr():
    assert lr_at(10, CFG, 100) == pytest.approx(6e-4)  # peak at the first decay step
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), CFG, 100) > lr_at(int(mid) + 1, CFG, 100)
    halfway = CFG.min_lr + 0.5 * (1 + math.cos(math.pi * 0.5)) * (CFG.max_lr - CFG.min_lr)
    assert lr_at(10 + 89 // 2, CFG, 100) == pytest.approx(halfway, rel=0.02)
    assert lr_at(99, CFG, 100) == pytest.approx(6e-5)  # the last step ends at min_lr
    assert lr_at(150, CFG, 100) == pytest.approx(6e-5)


def test_schedule_is_monotone_after_warmup():
    lrs = [lr_at(s, CFG, 50) for s in range(10, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    opt = build_optimizer(model, CFG, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n_params = len(decay["params"]) + len(no_decay["params"])
    assert n_params == len(list(model.parameters()))  # the tied matrix appears once


WSD = OptimConfig(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2)


def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr():
    assert WSD.decay_start(100) == 80
    assert [lr_at(s, WSD, 100) for s in (0, 9)] == pytest.approx([1e-4, 1e-3])
    assert all(lr_at(s, WSD, 100) == 1e-3 for s in range(10, 80))
    decay = [lr_at(s, WSD, 100) for s in range(80, 100)]
    assert decay[0] == pytest.approx(1e-3 - 0.9e-3 / 20)  # one of 20 decay steps done
    assert all(a - b == pytest.approx(0.9e-3 / 20) for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(1e-4) and lr_at(120, WSD, 100) == pytest.approx(1e-4)


def test_wsd_sqrt_decay_is_one_minus_sqrt_of_progress():
    cfg = dataclasses.replace(WSD, decay_shape="sqrt", min_lr=0.0)
    assert lr_at(84, cfg, 100) == pytest.approx(1e-3 * (1 - math.sqrt(5 / 20)))
    assert lr_at(99, cfg, 100) == pytest.approx(0.0, abs=1e-12)
    linear = dataclasses.replace(cfg, decay_shape="linear")
    assert all(lr_at(s, cfg, 100) <= lr_at(s, linear, 100) for s in range(80, 100))


def test_wsd_rates_before_the_decay_do_not_depend_on_the_budget():
    short, long = [lr_at(s, WSD, 100) for s in range(80)], [lr_at(s, WSD, 1000) for s in range(80)]
    assert short == long
    cosine = dataclasses.replace(WSD, schedule="cosine")
    assert lr_at(50, cosine, 100) != lr_at(50, cosine, 1000)  # why cosine runs cannot grow


def muon_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = muon_model()
    muon, adamw = build_optimizer(model, OptimConfig(name="muon", muon_lr=0.05), "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    decay, no_decay = adamw.param_groups
    assert {names[id(p)] for p in decay["params"]} == {
        "transformer.wte.weight",
        "transformer.wpe.weight",
    }
    assert all(p.dim() == 1 for p in no_decay["params"])
    every = [p for opt in (muon, adamw) for g in opt.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))
    assert muon.defaults["lr"] == 0.05 and muon.defaults["adjust_lr_fn"] == "original"
    assert muon.defaults["ns_steps"] == 5


def test_muon_ns_steps_reaches_torch_and_changes_the_update():
    """optim.muon_ns_steps is torch.optim.Muon's ns_steps: 3 iterations orthogonalise less
    exactly than 5, so one step from the same weights and gradients moves them differently."""
    after = {}
    for n in (3, 5):
        model = muon_model()
        muon, _ = build_optimizer(model, OptimConfig(name="muon", muon_ns_steps=n), "cpu")
        assert muon.defaults["ns_steps"] == n
        w = model.transformer.h[0].mlp.c_fc.weight
        torch.manual_seed(1)
        w.grad = torch.randn_like(w)
        start = w.detach().clone()
        muon.step()
        after[n] = w.detach() - start
    assert not torch.equal(after[3], after[5])


def test_the_schedule_scales_every_optimizer_from_its_own_peak():
    optimizers = build_optimizer(muon_model(), OptimConfig(name="muon", muon_lr=0.02), "cpu")
    optimizers.set_lr_scale(0.25)
    assert [g["lr"] for g in optimizers.param_groups] == pytest.approx([0.005, 1.5e-4, 1.5e-4])


def test_a_muon_step_orthogonalises_the_update():
    model = muon_model()
    optimizers = build_optimizer(model, OptimConfig(name="muon", muon_lr=0.02), "cpu")
    w = model.transformer.h[0].attn.c_proj.weight
    before = w.detach().clone()
    idx = torch.randint(0, 50257, (8, 17))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grad = torch.linalg.svdvals(w.grad)  # descending
    optimizers.step()
    update = torch.linalg.svdvals((before - w.detach()) / 0.02)
    # The first update is lr times Newton-Schulz of the gradient: its singular values, which
    # span two orders of magnitude, all land near 1 (0.5 to 1.5 for Keller Jordan's quintic
    # coefficients), except the few that are ~0 to begin with.
    k = int((grad >= 0.005 * grad[0]).sum())
    assert k >= 24 and grad[0] / grad[k - 1] > 50
    assert update[:k].min() > 0.5 and update[:k].max() < 1.5
