"""Hugging Face format: our GPT exported, loaded by transformers with equal logits, imported
back; a failed export leaves no partial files; the real GPT-2 shapes map both ways; the evaluate
stage reads an exported folder."""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.runs import final_weights
from helpers.tiny import small_config
from safetensors.torch import load_file
from tiktoken_ext import openai_public
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pipeline.config import EvaluateConfig
from pipeline.data.tokenizer import GPT2_FILES, OPENAI_FILES, get_encoding
from pipeline.errors import USER_ERROR, HFError, guard
from pipeline.evaluation.tasks import evaluate
from pipeline.export import main as export_main
from pipeline.interop import hf_export
from pipeline.interop.hf_export import export_hf, push_hf
from pipeline.interop.hf_weights import (
    BUFFERS,
    from_hf_state_dict,
    hf_config,
    load_hf_dir,
    model_config_from_hf,
    to_hf_state_dict,
)
from pipeline.model import GPT, PRESETS, ModelConfig
from pipeline.scoring.hellaswag import evaluate_hellaswag, load_items
from pipeline.training.loop import train


@pytest.fixture(scope="module")
def model() -> GPT:
    """Random weights, the padding rows of the embedding included (they must not leak)."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """An export with the tokenizer files it always carries: tiktoken's own `gpt2` files."""
    return export_hf(model, tmp_path_factory.mktemp("hf"))


def test_transformers_loads_the_export_with_equal_logits(model, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["n_positions"] == config["n_ctx"] == 64
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["tie_word_embeddings"]
    tensors = load_file(exported / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once, as save_pretrained does
    assert tensors["transformer.wte.weight"].shape == (50257, 32)  # padding rows dropped
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)
    hf = GPT2LMHeadModel.from_pretrained(exported).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x, all_logits=True)  # (2, 64, 50304): logits at every position
        theirs = hf(x).logits  # (2, 64, 50257)
    torch.testing.assert_close(theirs, ours[..., :50257], atol=1e-4, rtol=1e-4)


def test_import_gives_back_the_weights_with_zero_padding_rows(model, exported):
    loaded = load_hf_dir(exported)
    assert loaded.cfg == model.cfg
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again
    wte = loaded.transformer.wte.weight
    assert torch.equal(wte[:50257], model.transformer.wte.weight[:50257])
    assert torch.count_nonzero(wte[50257:]) == 0  # padding restored as zeros
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        if "wte" not in name and "lm_head" not in name:
            assert torch.equal(value, original[name]), name
    exact = load_hf_dir(exported, padded_vocab_size=None)  # no padding: HF's exact shapes
    assert exact.transformer.wte.weight.shape == (50257, 32)


def test_folders_written_by_transformers_and_the_hub_layout_import(model, exported, tmp_path):
    hf = GPT2LMHeadModel.from_pretrained(exported)
    hf.save_pretrained(tmp_path / "saved")
    again = load_hf_dir(tmp_path / "saved").state_dict()
    assert again.keys() == model.state_dict().keys()
    assert torch.equal(
        again["transformer.h.1.attn.c_proj.weight"], model.transformer.h[1].attn.c_proj.weight
    )
    # openai-community/gpt2's model.safetensors: no `transformer.` prefix, causal-mask buffers
    hub = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    del hub["lm_head.weight"]
    hub |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)}
    converted = from_hf_state_dict(hub)
    assert converted.keys() == model.state_dict().keys()
    assert torch.equal(
        converted["transformer.h.1.mlp.c_fc.weight"], model.transformer.h[1].mlp.c_fc.weight
    )
    untied = dict(hf.state_dict(), **{"lm_head.weight": torch.zeros(50257, 32)})
    with pytest.raises(HFError, match="untied"):
        from_hf_state_dict(untied)


@pytest.mark.parametrize("preset", ["gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl"])
def test_real_gpt2_shapes_map_both_ways(preset):
    ours = PRESETS[preset]
    hf_cfg = GPT2Config(n_layer=ours.n_layer, n_head=ours.n_head, n_embd=ours.n_embd)
    assert model_config_from_hf(hf_cfg.to_dict()) == ours
    exported = GPT2Config(**hf_config(ours))  # every field a valid GPT2Config argument
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon"):
        assert getattr(exported, key) == getattr(hf_cfg, key), key
    assert exported.activation_function == "gelu_new" and exported.tie_word_embeddings
    with torch.device("meta"):  # shapes only, no memory
        theirs = GPT2LMHeadModel(hf_cfg).state_dict()
        mine = GPT(ours).state_dict()
    converted = from_hf_state_dict(theirs)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in mine.items()}
    back = to_hf_state_dict(mine)
    weights = {k: v for k, v in theirs.items() if k != "lm_head.weight" and not k.endswith(BUFFERS)}
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in weights.items()}


def test_a_failed_export_leaves_no_partial_files(
    model, exported, shared_data, tmp_path, monkeypatch
):
    out = Path(shutil.copytree(exported, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(HFError, match="none of encoder.json"):
        export_hf(model, out, tokenizer_dir=tmp_path / "empty")  # checked before any write

    def disk_full(src, dest):
        Path(dest).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    # the weights and config.json are written, then copying the tokenizer fails
    monkeypatch.setattr(hf_export, "shutil", SimpleNamespace(copyfile=disk_full))
    with pytest.raises(OSError, match="No space left"):
        export_hf(model, out, tokenizer_dir=shared_data / "gpt2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export
    with pytest.raises(OSError, match="No space left"):
        export_hf(model, tmp_path / "fresh", tokenizer_dir=shared_data / "gpt2")
    assert not any((tmp_path / "fresh").iterdir())


def test_tokenizer_files_match_tiktoken(exported, shared_data):
    text = (shared_data / "text" / "the-verdict.txt").read_text()[:2000]
    text += (shared_data / "text" / "tinyshakespeare_input.txt").read_text()[:2000]
    tokenizer = AutoTokenizer.from_pretrained(exported)  # no other argument needed
    assert tokenizer(text)["input_ids"] == get_encoding().encode_ordinary(text)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256 and len(tokenizer) == 50257
    special = json.loads((exported / "special_tokens_map.json").read_text())
    assert special == {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}


def test_tokenizer_files_are_tiktokens_own(model, exported, shared_data, tmp_path):
    # the URLs and sha256 tiktoken builds `gpt2` from are the ones we read its cache by
    source = inspect.getsource(openai_public.gpt2)
    assert all(OPENAI_FILES + name in source and sha in source for name, sha in GPT2_FILES.items())
    assert (exported / "vocab.json").read_bytes() == (
        shared_data / "gpt2/encoder.json"
    ).read_bytes()
    assert (exported / "merges.txt").read_bytes() == (shared_data / "gpt2/vocab.bpe").read_bytes()
    # --tokenizer-dir still takes OpenAI's files from a folder: the same export
    export_hf(model, tmp_path, tokenizer_dir=shared_data / "gpt2")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (exported / name).read_bytes(), name


def test_evaluate_reads_an_exported_folder(model, exported, shared_data):
    path = shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl"
    cfg = EvaluateConfig(
        pretrained=str(exported),
        tasks=["hellaswag"],
        hellaswag_path=str(path),
        hellaswag_limit=6,
        sample_tokens=0,
    )
    result = evaluate(cfg)
    direct = evaluate_hellaswag(model, load_items(path, limit=6), batch_items=8)
    assert {k: result["hellaswag"][k] for k in direct} == direct
    assert result["step"] is None and (exported / "eval" / f"{exported.name}.md").is_file()


def test_command_line_exports_a_run_and_push_refuses_other_folders(sample_shards, tmp_path, capsys):
    train(small_config(sample_shards, tmp_path, max_steps=1, eval_tokens=0))
    out = tmp_path / "export"
    export_main(
        ["checkpoint", str(tmp_path / "run"), str(out)]
    )  # python -m pipeline.export checkpoint ...
    assert "model.safetensors" in capsys.readouterr().out and (out / "config.json").is_file()
    trained = load_hf_dir(out).state_dict()
    saved = final_weights(tmp_path / "run")
    assert torch.equal(trained["transformer.ln_f.weight"], saved["transformer.ln_f.weight"])
    with pytest.raises(HFError, match="no config.json, model.safetensors"):
        push_hf(tmp_path / "run", "someone/gpt2")  # checked before any network access
    with pytest.raises(SystemExit) as info:
        guard(export_main)(["push", str(tmp_path / "run"), "someone/gpt2"])
    assert info.value.code == USER_ERROR
    assert re.match(r"error: .* no config.json", capsys.readouterr().err)
