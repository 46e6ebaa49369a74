"""GPT-2 model: published sizes, causality, initialisation, tied weights, generation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.model import GPT, PRESETS, ModelConfig

# Parameter counts of OpenAI's released checkpoints (Hugging Face GPT2LMHeadModel, tied
# embeddings counted once), vocabulary 50,257.
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2_medium": 354_823_168,
    "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200,
}
SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published_size(name):
    cfg = dataclasses.replace(PRESETS[name], padded_vocab_size=None)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(cfg)
    assert model.num_params() == PUBLISHED[name]


def test_padding_adds_only_embedding_rows():
    with torch.device("meta"):
        padded, plain = (
            GPT(PRESETS["gpt2"]),
            GPT(dataclasses.replace(PRESETS["gpt2"], padded_vocab_size=None)),
        )
    assert padded.num_params() - plain.num_params() == (50304 - 50257) * 768


def test_embeddings_are_tied_and_residual_projections_scaled():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=32))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(SMALL, n_embd=64))
    idx, targets = torch.randint(0, 50257, (2, 4, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 16, 50304)
    assert loss.item() == pytest.approx(math.log(50257), abs=0.2)


def test_logits_without_targets_all_or_last_position():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 50257, (3, 16))
    with_loss, _ = model(idx, idx)
    every, none = model(idx, all_logits=True)
    last, _ = model(idx)
    assert none is None and every.shape == (3, 16, 50304) and last.shape == (3, 1, 50304)
    torch.testing.assert_close(every, with_loss)
    torch.testing.assert_close(last, every[:, -1:])


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 50257, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50257
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(SMALL)(torch.zeros(1, 17, dtype=torch.long))


def test_invalid_config_lists_every_problem():
    with pytest.raises(ValueError) as e:
        GPT(ModelConfig(n_head=5, n_embd=768, padded_vocab_size=100))
    assert "n_head" in str(e.value) and "padded_vocab_size" in str(e.value)


def test_generation_greedy_top_k_and_top_p_agree_and_skip_padding():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    with torch.no_grad():  # make a padding row the most likely token: it must never be chosen
        model.lm_head.weight[50300] = model.lm_head.weight[:50257].sum(0)
    idx = torch.randint(0, 50257, (2, 4))
    greedy = model.generate(idx, 20, temperature=0)
    top1 = model.generate(idx, 20, temperature=1.0, top_k=1)
    nucleus = model.generate(idx, 20, temperature=1.0, top_p=1e-6)
    assert greedy.shape == (2, 24)
    assert torch.equal(greedy, top1) and torch.equal(greedy, nucleus)
    g = torch.Generator().manual_seed(3)
    sampled = model.generate(idx, 40, temperature=1.0, top_p=0.9, generator=g)
    assert sampled.max().item() < 50257
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(sampled, model.generate(idx, 40, temperature=1.0, top_p=0.9, generator=g2))


def test_generation_crops_context_to_block_size():
    model = GPT(SMALL).eval()
    out = model.generate(torch.zeros(1, 16, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 21)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(SMALL)
        model.activation_checkpointing = checkpointing
        idx, targets = torch.randint(0, 50257, (2, 2, 16))
        model(idx, targets)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
