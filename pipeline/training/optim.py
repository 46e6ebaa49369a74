"""Optimizers (AdamW, or Muon + AdamW) and the learning-rate schedules (cosine, WSD)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from pipeline.config import OptimConfig, TrainConfig, budget_steps
from pipeline.errors import ConfigError

# --------------------------------------------------------------------------- schedules


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """AdamW's learning rate at optimizer step `step` (0-based) of a run of max_steps steps;
    every other rate (Muon's) follows the same curve scaled to its own peak (lr_scale).

    Warmup (both schedules): linear over warmup_steps, from max_lr/warmup_steps at step 0 to
    max_lr at step warmup_steps-1.
    cosine: cosine decay from max_lr at step warmup_steps to min_lr at the last step,
    max_steps-1 (GPT-3, Brown et al. 2020, appendix B; nanoGPT `get_lr`).
    wsd: max_lr until cfg.decay_start(max_steps), then over the D = max_steps - decay_start
    decay steps, with progress p = (step - decay_start + 1)/D reaching 1 at the last step:
    linear, max_lr + (min_lr - max_lr)·p (the trapezoidal schedule of modded-nanogpt), or sqrt,
    min_lr + (max_lr - min_lr)·(1 - sqrt(p)) (Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations", §3).
    Steps past the end stay at min_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = cfg.decay_start(max_steps)
        if step < start:
            return cfg.max_lr
        progress = min(1.0, (step - start + 1) / (max_steps - start))
        if cfg.decay_shape == "sqrt":
            return cfg.min_lr + (cfg.max_lr - cfg.min_lr) * (1 - math.sqrt(progress))
        return cfg.max_lr + (cfg.min_lr - cfg.max_lr) * progress
    decay_steps = max_steps - 1 - cfg.warmup_steps
    if decay_steps <= 0:
        return cfg.max_lr if step < max_steps else cfg.min_lr
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


# --------------------------------------------------------------------------- optimizers


class Optimizers:
    """The optimizers of a run, stepped and zeroed as one: [AdamW] or [Muon, AdamW].

    Each parameter group keeps its peak rate under "peak_lr"; set_lr_scale sets every group's
    rate to peak_lr times the schedule's factor, so one schedule drives both optimizers.
    `optimizers` may hold accelerate's wrappers (AcceleratedOptimizer); `raw` unwraps them.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def raw(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers themselves (for checkpoint state dicts)."""
        return [getattr(opt, "optimizer", opt) for opt in self.optimizers]

    @property
    def sharded(self) -> bool:
        """Whether one of them splits its state over the processes (is_sharded)."""
        return any(is_sharded(opt) for opt in self.optimizers)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_scale(self, scale: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * scale


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon trains this parameter: a 2-D weight inside a transformer block (attention
    c_attn, c_proj; MLP c_fc, c_proj). Embeddings (the tied wte/lm_head, wpe), biases and
    LayerNorms stay with AdamW (Jordan et al. 2024: Muon is for hidden-layer matrices)."""
    return param.dim() == 2 and name.startswith("transformer.h.")


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device_type: str, world_size: int = 1
) -> Optimizers:
    """The run's optimizers at their peak rates (the schedule scales them each step).

    AdamW decays 2-D tensors only (matmul weights and embeddings), not biases or LayerNorm gains
    (nanoGPT `configure_optimizers`); its fused CUDA kernel is used when cfg.fused is true, or
    when it is null and device_type is "cuda". With cfg.name == "muon", the block matrices
    (is_muon_matrix) go to torch.optim.Muon (lr muon_lr, Nesterov momentum muon_momentum,
    weight decay muon_weight_decay, adjust_lr_fn muon_adjust_lr) and AdamW keeps the rest.
    The fused q, k, v matrix c_attn (3C, C) is orthogonalised as one matrix (see README,
    "Training cheaper", for the measurement that chose this over three (C, C) blocks).

    On world_size > 1 processes (data parallel: the process group must exist) and with
    cfg.muon_sharded (the default), Muon runs inside
    torch.distributed.optim.ZeroRedundancyOptimizer: each matrix's Newton–Schulz update and
    momentum buffer live on one rank (the matrices split by size, largest first), which
    broadcasts the updated weight to the others. The weights are bit-identical to every rank
    running Muon on every matrix, for 1/world_size of the work and of the momentum memory
    (BENCHMARKS.md, "muon: the optimizer step split over processes"). AdamW stays replicated.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied: once
    muon = [p for n, p in named if cfg.name == "muon" and is_muon_matrix(n, p)]
    chosen = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in chosen]
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.max_lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )
    optimizers = [adamw]
    if muon:
        settings = dict(
            lr=cfg.muon_lr,
            weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=True,
            adjust_lr_fn=cfg.muon_adjust_lr,
            ns_steps=cfg.muon_ns_steps,
        )
        if world_size > 1 and cfg.muon_sharded:
            optimizers.insert(
                0, ZeroRedundancyOptimizer(muon, optimizer_class=torch.optim.Muon, **settings)
            )
        else:
            optimizers.insert(0, torch.optim.Muon(muon, **settings))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return Optimizers(optimizers)


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether each rank holds only part of this optimizer's state (ZeroRedundancyOptimizer):
    saving it is collective (consolidate_state_dict on every rank)."""
    return isinstance(getattr(optimizer, "optimizer", optimizer), ZeroRedundancyOptimizer)


def load_sharded_named_state(
    model: torch.nn.Module, optimizer: ZeroRedundancyOptimizer, named: dict
) -> dict:
    """Load this rank's part of an optimizer state keyed by parameter name (the layout of
    torch.distributed.checkpoint's get_optimizer_state_dict: {"state": {name: {key: tensor}},
    "param_groups": [{..., "params": [names]}]}, written by any number of processes) into a
    ZeroRedundancyOptimizer; returns what is left of `named` (the other optimizers' groups and
    states). Raises KeyError when the state has no group with exactly the parameters of one of
    the optimizer's groups (another model or optimizer)."""
    names = {p: n for n, p in model.named_parameters()}
    mine = [[names[p] for p in g["params"]] for g in optimizer.param_groups]
    groups, index, state = [], 0, {}
    for params in mine:
        found = [g for g in named["param_groups"] if set(g["params"]) == set(params)]
        if not found:
            raise KeyError(f"no saved optimizer group holds the Muon matrices {params[0]}, ...")
        indices = list(range(index, index + len(params)))
        groups.append({**found[0], "params": indices})
        state.update({i: named["state"][n] for i, n in zip(indices, params) if n in named["state"]})
        index += len(params)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    optimizer.state.clear()  # copies of what the local optimizer (optimizer.optim) now holds
    taken = {n for params in mine for n in params}
    return {
        "state": {n: s for n, s in named["state"].items() if n not in taken},
        "param_groups": [g for g in named["param_groups"] if not taken & set(g["params"])],
    }


# --------------------------------------------------------------------------- continuing a run


def continuation_problem(state: dict, cfg: TrainConfig) -> str | None:
    """Why the checkpoint whose state.json is `state` cannot continue the run cfg describes
    with the same learning rates up to its step, or None when it can.

    A checkpoint of step s continues a run of another budget only when every step before s
    had the same rate under both budgets: for wsd, s <= decay_start of the old and of the new
    budget (the checkpoint predates both decays), so an extended run equals a fresh run of the
    larger budget up to the new decay. A returned reason means an older checkpoint may do
    (skip this one). Raises ConfigError when no checkpoint of the run can continue cfg: another
    optimizer (its state does not carry over), another schedule, or another budget for a
    cosine schedule (its whole decay depends on max_steps).
    """
    saved = state.get("config") or {}
    old_optim = saved.get("optim", {})
    old_name = old_optim.get("name", "adamw")
    if old_name != cfg.optim.name:
        raise ConfigError(
            f"the run's checkpoints were trained with optim={old_name}, this launch asks for "
            f"optim={cfg.optim.name}: their optimizer state does not carry over. Resume with "
            f"optim={old_name}, or start a new run (another trainer.run_name)"
        )
    if "trainer" not in saved:
        return None  # no recorded budget (a checkpoint written outside pipeline.train)
    old = saved["trainer"]
    old_max = budget_steps(old.get("max_steps"), old.get("max_tokens"), old["tokens_per_step"])
    new_max = cfg.max_steps
    old_schedule = old_optim.get("schedule", "cosine")
    if old_schedule != cfg.optim.schedule:
        raise ConfigError(
            f"the run was trained with optim.schedule={old_schedule}, this launch asks for "
            f"optim.schedule={cfg.optim.schedule}: the learning rate would jump. Resume with "
            f"optim.schedule={old_schedule}, or start a new run (another trainer.run_name)"
        )
    if old_max == new_max:
        return None
    if cfg.optim.schedule != "wsd":
        raise ConfigError(
            f"trainer.max_steps changed from {old_max} to {new_max} (directly or through "
            f"max_tokens), but this run follows a cosine schedule, whose decay spans all "
            f"{old_max} steps: continuing would make the learning rate jump, and the finished "
            f"run has already decayed. Resume with its budget ({old_max} steps), or train the "
            "larger budget as a new run (another trainer.run_name), with optim.schedule=wsd "
            "if you may want to extend it later"
        )
    step = state["step"]
    old_fraction = old_optim.get("decay_fraction", cfg.optim.decay_fraction)
    old_start = dataclasses.replace(cfg.optim, decay_fraction=old_fraction).decay_start(old_max)
    limit = min(old_start, cfg.decay_start)
    if step <= limit:
        return None
    return (
        f"step {step} is past the stable phase shared by the old budget ({old_max} steps, "
        f"decay from step {old_start}) and the new one ({new_max} steps, decay from step "
        f"{cfg.decay_start}): a WSD run continues with another budget only from a checkpoint "
        f"of step {limit} or earlier"
    )
