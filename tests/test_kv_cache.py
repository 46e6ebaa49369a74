"""Generation with the KV cache: the same tokens and logits as the full forward at every step,
on random GPT-2-shaped models and on a tiny model trained on real FineWeb tokens, also when
the prompt and the new tokens exceed block_size (the cache is then recomputed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny import small_config

from pipeline.config import SampleConfig
from pipeline.data.tokenizer import get_encoding
from pipeline.evaluation.loading import load_for_eval
from pipeline.evaluation.sample import sample
from pipeline.model import GPT, KVCache, ModelConfig
from pipeline.scoring.sampling import generate_text
from pipeline.training.loop import train

RANDOM_MODELS = {
    "2x2x32, block 16, padded vocabulary": ModelConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=16
    ),
    "3x4x64, block 24, exact vocabulary": ModelConfig(
        n_layer=3, n_head=4, n_embd=64, block_size=24, padded_vocab_size=None
    ),
    "4x6x48, block 32, no biases": ModelConfig(
        n_layer=4, n_head=6, n_embd=48, block_size=32, bias=False
    ),
}
PROMPT = "The meaning of life is, in short,"


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def new_cache(model: GPT) -> list[KVCache]:
    return [KVCache(model.cfg.block_size) for _ in model.transformer.h]


@pytest.fixture(scope="module")
def run_dir(sample_shards, tmp_path_factory) -> Path:
    """A tiny GPT-2 (2 layers, 32 wide, block 64) trained for 4 steps on real FineWeb tokens."""
    runs = tmp_path_factory.mktemp("runs")
    train(small_config(sample_shards, runs, max_steps=4, eval_tokens=0, checkpoint_interval=4))
    return runs / "run"


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> GPT:
    """The tiny run's model, loaded from its checkpoint."""
    return load_for_eval(str(run_dir)).model.eval()


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
@pytest.mark.parametrize("prompt_len,new_tokens", [(1, 10), (5, 11), (5, 40), (40, 6)])
def test_greedy_tokens_are_the_same_with_and_without_the_cache(name, prompt_len, new_tokens):
    # (5, 11) stays within every block; (5, 40) slides past it; (40, 6) starts from a prompt
    # longer than the block, which is cropped.
    model = random_model(RANDOM_MODELS[name])
    idx = torch.randint(0, model.cfg.vocab_size, (2, prompt_len))
    cached = model.generate(idx, new_tokens, temperature=0)
    assert cached.shape == (2, prompt_len + new_tokens)
    assert torch.equal(cached, model.generate(idx, new_tokens, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_cached_logits_equal_the_full_forward_at_every_position(name):
    model = random_model(RANDOM_MODELS[name], seed=1)
    block = model.cfg.block_size
    tokens = torch.randint(0, model.cfg.vocab_size, (3, block))
    cache = new_cache(model)
    with torch.no_grad():
        prefill, _ = model(tokens[:, :4], cache=cache)  # (3, 1, V)
        steps = [prefill] + [model(tokens[:, [t]], cache=cache)[0] for t in range(4, block)]
        full, _ = model(tokens, all_logits=True)  # (3, block, V)
    assert cache[0].length == block and all(kv.length == block for kv in cache)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 3:], rtol=0, atol=1e-5)


def test_the_cache_takes_a_prompt_then_one_token_at_a_time_within_the_block():
    model = random_model(RANDOM_MODELS["2x2x32, block 16, padded vocabulary"])
    cache = new_cache(model)
    with torch.no_grad():
        model(torch.zeros(1, 14, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="2 tokens after 14 cached: .* one token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        for _ in range(2):  # positions 14 and 15, the last
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_greedy_and_seeded_sampling_on_a_trained_checkpoint(trained):
    # 18 prompt tokens + 56 new ones > block_size 64: the last 9 steps recompute the cache
    enc = get_encoding()
    idx = torch.tensor([enc.encode_ordinary(PROMPT) * 2])  # (1, 18)
    greedy = trained.generate(idx, 56, temperature=0)
    assert torch.equal(greedy, trained.generate(idx, 56, temperature=0, use_cache=False))
    assert greedy.max().item() < enc.n_vocab  # padding rows are never chosen
    for top_k, top_p in ((None, None), (200, 0.9)):
        runs = [
            trained.generate(idx, 56, 0.8, top_k, top_p, torch.Generator().manual_seed(5), cache)
            for cache in (True, False)
        ]
        assert torch.equal(*runs), (top_k, top_p)


def test_cached_logits_of_the_trained_checkpoint_equal_the_full_forward(trained):
    tokens = torch.tensor([get_encoding().encode_ordinary(PROMPT * 8)[:64]])  # (1, 64)
    cache = new_cache(trained)
    with torch.no_grad():
        prefill, _ = trained(tokens[:, :10], cache=cache)
        steps = [prefill] + [trained(tokens[:, [t]], cache=cache)[0] for t in range(10, 64)]
        full, _ = trained(tokens, all_logits=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=0, atol=1e-5)


def test_samples_generate_with_the_cache_unless_told(trained):
    lengths = []

    def record(module, args, kwargs):
        lengths.append((args[0].size(1), kwargs.get("cache") is not None))

    handle = trained.register_forward_pre_hook(record, with_kwargs=True)
    enc = get_encoding()
    text = generate_text(trained, enc, PROMPT, 5, temperature=0)  # as training's samples
    prompt_len = len(enc.encode_ordinary(PROMPT))
    assert lengths == [(prompt_len, True)] + [(1, True)] * 4  # one prefill, then one token each
    lengths.clear()
    assert generate_text(trained, enc, PROMPT, 5, temperature=0, use_cache=False) == text
    assert lengths == [(prompt_len + i, False) for i in range(5)]
    handle.remove()


def test_the_sample_command_samples_the_same_text_without_the_cache(run_dir):
    cfg = SampleConfig(checkpoint=str(run_dir), prompt=PROMPT, max_new_tokens=60)
    cached = sample(cfg)
    cfg.use_cache = False
    assert sample(cfg) == cached and all(t.startswith(PROMPT) for t in cached)
