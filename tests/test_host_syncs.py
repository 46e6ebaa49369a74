"""At most one host synchronisation per optimizer step: the training loop's steps, logging
included, read from the device once per step (loss, stop flag and gradient norm in one
transfer), after the next micro-batch was fetched. Counted on the CPU as the calls that make a
GPU's host wait (Tensor.item, tolist, numpy, cpu, and bool/float/int of a tensor), with fused
AdamW as on CUDA; `tests/test_gpu.py` counts the same on a GPU with torch's sync debug mode."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter

import pytest
import torch
from helpers.tiny import tiny_run, train_config

from pipeline.training import loop
from pipeline.training.loop import setup

WAITS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
"""Tensor methods that, on a CUDA tensor, make the host wait for the device."""


class SyncCounter:
    """Counts calls of WAITS on the training thread while on (monkeypatched onto torch.Tensor).
    Not those of the thread that writes a checkpoint in the background: it reads the host copy
    that saving staged, which does not hold the device."""

    def __init__(self, monkeypatch):
        self.calls: Counter = Counter()
        self.on = False
        self.thread = threading.get_ident()
        for name in WAITS:
            monkeypatch.setattr(
                torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name))
            )

    def _counting(self, name, original):
        @functools.wraps(original)
        def counted(tensor, *args, **kwargs):
            if self.on and threading.get_ident() == self.thread:
                self.calls[name] += 1
            return original(tensor, *args, **kwargs)

        return counted

    @contextlib.contextmanager
    def paused(self):
        on, self.on = self.on, False
        try:
            yield
        finally:
            self.on = on


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_one_wait_per_step_through_the_training_loop(sample_shards, tmp_path, monkeypatch, optim):
    steps = 12
    settings = [
        f"optim={optim}",
        "optim.fused=true",
        f"trainer.max_steps={steps}",
        "trainer.log_interval=5",
        "eval.tokens=0",
        "checkpoint.interval=0",
    ]
    cfg = train_config(tiny_run(sample_shards, tmp_path, "run", *settings))
    counter = SyncCounter(monkeypatch)
    with contextlib.ExitStack() as held:
        run = setup(cfg, held)
        save = run.save
        monkeypatch.setattr(run, "save", lambda: counter.paused()(save)())  # the last step's
        counter.on = True
        summary = loop._train(run)
        counter.on = False
    assert summary["steps"] == steps
    assert counter.calls == Counter({"tolist": steps})


def test_prefetch_returns_the_same_batches_and_keeps_the_position(sample_shards, tmp_path):
    cfg = train_config(
        tiny_run(sample_shards, tmp_path, "run", "trainer.max_steps=4", "eval.tokens=0")
    )
    with contextlib.ExitStack() as held:
        run = setup(cfg, held)
        plain = [run.loader.next_batch() for _ in range(3)]
        run.loader.load_state_dict({**run.loader.state_dict(), "position": 0})
        fetched = []
        for _ in range(3):
            run.loader.prefetch()
            position = run.loader.state_dict()["position"]
            run.loader.prefetch()  # twice: still the one batch ahead
            assert run.loader.state_dict()["position"] == position
            fetched.append(run.loader.next_batch())
    for (x, y), (px, py) in zip(plain, fetched):
        assert torch.equal(x, px) and torch.equal(y, py)
