"""Checkpoint tensors through DCP, in one process: what is saved is what loads (weights,
optimizer states and the parameter groups' values), the tied embedding is stored once, and an
asynchronous save holds the weights of the moment it was called, whatever training does next."""

from __future__ import annotations

import torch

from pipeline.model import GPT, ModelConfig
from pipeline.training.checkpoint.folder import (
    load_checkpoint,
    model_tensors,
    save_checkpoint,
)
from pipeline.training.checkpoint.tensors import SafeReader, TensorSaver


def model_and_optimizer(lr: float, seed: int) -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = GPT(
        ModelConfig(
            n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128, padded_vocab_size=128
        )
    )
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def train_step(model: GPT, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 128, (2, 16))
    _, loss = model(ids, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_what_is_saved_loads_back_with_the_parameter_groups_values(tmp_path):
    model, optimizer = model_and_optimizer(lr=0.0123, seed=0)
    train_step(model, optimizer)
    path, done = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep_last=2)
    done.result()
    keys = SafeReader(path).read_metadata().state_dict_metadata
    assert "model.transformer.wte.weight" in keys and "model.lm_head.weight" not in keys
    other, other_optimizer = model_and_optimizer(lr=0.5, seed=1)
    load_checkpoint(path, other, other_optimizer, restore_rng=False)
    assert other_optimizer.param_groups[0]["lr"] == 0.0123
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    for i in saved:
        assert all(torch.equal(saved[i][k], loaded[i][k]) for k in saved[i])
    assert model_tensors(path).keys() == model.state_dict().keys()


def test_an_asynchronous_save_holds_the_weights_of_its_step(tmp_path):
    model, optimizer = model_and_optimizer(lr=0.01, seed=0)
    train_step(model, optimizer)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    saver = TensorSaver(True, torch.device("cpu"))
    try:
        path, done = save_checkpoint(tmp_path, 1, model, optimizer, {}, 2, saver=saver)
        for _ in range(3):  # training goes on while the files are written
            train_step(model, optimizer)
        done.result()
    finally:
        saver.close()
    saved = model_tensors(path)
    assert all(torch.equal(saved[k], at_save[k]) for k in at_save)
    assert not torch.equal(model.transformer.wte.weight, at_save["transformer.wte.weight"])
