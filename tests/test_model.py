"""GPT-2 model: published sizes, causality, initialisation, tied weights, generation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import (
    GPT,
    MAX_LOSS_CHUNKS,
    PRESETS,
    ModelConfig,
    chunked_cross_entropy,
    loss_chunk_rows,
)

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
    assert logits is None  # the chunked loss never holds the (B, T, V) logits
    assert loss.item() == pytest.approx(math.log(50257), abs=0.2)
    model.loss_impl = "full"
    logits, full = model(idx, targets)
    assert logits.shape == (4, 16, 50304)
    torch.testing.assert_close(full, loss)


def test_logits_without_targets_all_or_last_position():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    model.loss_impl = "full"
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
    a, _ = model(idx, all_logits=True)
    b, _ = model(changed, all_logits=True)
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


# --------------------------------------------------------------------------- chunked loss


@pytest.fixture(scope="module")
def verdict_tokens(shared_data) -> torch.Tensor:
    """GPT-2 ids of real text ("The Verdict", the book's toy corpus): (4, 129) int64."""
    import tiktoken

    text = (shared_data / "text" / "the-verdict.txt").read_text()
    ids = tiktoken.get_encoding("gpt2").encode_ordinary(text)[: 4 * 129]
    return torch.tensor(ids).view(4, 129)


def peaked_model() -> GPT:
    """A small GPT-2 whose logits are far from uniform (embeddings scaled up), so the softmax
    and its gradient are exercised where they are not ~1/V."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=128))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    return model


def loss_and_grads(model: GPT, impl: str, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    model.loss_impl = impl
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_and_gradients_equal_the_full_logits_path(verdict_tokens):
    model = peaked_model()
    full, full_grads = loss_and_grads(model, "full", verdict_tokens)
    chunked, chunked_grads = loss_and_grads(model, "chunked", verdict_tokens)
    assert full.item() > 12  # peaked logits: far from ln(50257) = 10.8 at init
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for name, g in full_grads.items():  # every parameter, the tied embedding included
        relative = (chunked_grads[name] - g).norm() / g.norm()
        assert relative < 1e-5, name


def test_chunks_that_do_not_divide_the_positions_give_the_same_loss(verdict_tokens):
    model = peaked_model()
    x = torch.randn(4 * 128, 64, requires_grad=True)
    w = model.lm_head.weight.detach().requires_grad_()
    targets = verdict_tokens[:, 1:].reshape(-1)
    reference = F.cross_entropy((x @ w.t()).float(), targets)
    reference.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    loss = chunked_cross_entropy(x, w, targets, chunk_rows=7)  # 73 chunks, the last of 1 row
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert (x.grad - grads[0]).norm() / grads[0].norm() < 1e-5
    assert (w.grad - grads[1]).norm() / grads[1].norm() < 1e-5


def test_loss_chunks_follow_the_device_budget_and_stay_few():
    """GPT-2's padded vocabulary: 256 rows (64 MiB of float32 logits) on a CPU, 4,096 (1 GiB)
    on a GPU; never more than MAX_LOSS_CHUNKS chunks, whatever the micro-batch."""
    assert loss_chunk_rows(50304) == 256 and loss_chunk_rows(10**9) == 1
    assert loss_chunk_rows(50304, 4 * 1024, "cpu") == 256  # 16 chunks
    assert loss_chunk_rows(50304, 64 * 1024, "cuda") == 4096  # 16 chunks, was 256 chunks
    assert loss_chunk_rows(50304, 8 * 1024, "cuda") == 4096  # 2 chunks
    for rows, device in [(64 * 1024, "cpu"), (10**6, "cuda"), (123_457, "cuda")]:
        chunk = loss_chunk_rows(50304, rows, device)
        assert -(-rows // chunk) <= MAX_LOSS_CHUNKS
    assert loss_chunk_rows(50304, 64 * 1024, "mps") == loss_chunk_rows(50304, 64 * 1024, "cpu")


def test_per_position_losses_for_evaluation(verdict_tokens):
    model = peaked_model().eval()
    x, y = verdict_tokens[:, :-1], verdict_tokens[:, 1:]
    with torch.no_grad():
        _, per_position = model(x, y, reduction="none")
        _, mean = model(x, y)
        logits, _ = model(x, all_logits=True)
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), y.flatten(), reduction="none"
    )
    assert per_position.shape == (4, 128) and per_position.dtype == torch.float32
    torch.testing.assert_close(per_position.flatten(), expected, rtol=1e-5, atol=1e-5)
    assert mean.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="no gradient"):
        model(x, y, reduction="none")


def test_chunked_loss_under_bf16_autocast_tracks_the_full_path(verdict_tokens):
    model, tokens = peaked_model(), verdict_tokens[:2, :65]
    with torch.autocast("cpu", torch.bfloat16):
        full, full_grads = loss_and_grads(model, "full", tokens)
        chunked, chunked_grads = loss_and_grads(model, "chunked", tokens)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(full.item(), rel=1e-3)
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"):
        g = full_grads[name]
        assert (chunked_grads[name] - g).norm() / g.norm() < 2e-2, name
        assert chunked_grads[name].dtype == torch.float32


def test_chunked_loss_traces_under_torch_compile(verdict_tokens):
    model = peaked_model()
    eager, eager_grads = loss_and_grads(model, "chunked", verdict_tokens)
    compiled = torch.compile(model, backend="aot_eager")  # autograd graph capture, CPU-fast
    model.zero_grad(set_to_none=True)
    _, loss = compiled(verdict_tokens[:, :-1], verdict_tokens[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    g, expected = model.transformer.wte.weight.grad, eager_grads["transformer.wte.weight"]
    assert (g - expected).norm() / expected.norm() < 1e-5


@pytest.mark.gpu
def test_liger_kernel_matches_the_chunked_loss_on_cuda(verdict_tokens):
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tokens = peaked_model().cuda(), verdict_tokens.cuda()
    with torch.autocast("cuda", torch.bfloat16):
        chunked, chunked_grads = loss_and_grads(model, "chunked", tokens)
        liger, liger_grads = loss_and_grads(model, "liger", tokens)
    assert liger.item() == pytest.approx(chunked.item(), rel=1e-3)
    for name, g in chunked_grads.items():
        assert (liger_grads[name] - g).norm() / g.norm() < 2e-2, name
