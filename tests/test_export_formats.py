"""Export formats other than Hugging Face's, from a real trained checkpoint: the book's GPTModel
(llms-from-scratch) computes our logits on real text; llm.c's model.bin, read back by a reader
written here from llm.c's layout, holds every tensor exactly; bad inputs and failed writes exit
2 with one line and leave no partial file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.proc import run_module
from helpers.tiny import small_config

from pipeline.data.tokenizer import get_encoding
from pipeline.errors import USER_ERROR, OutputError, guard
from pipeline.export import main as export_main
from pipeline.interop import llmc
from pipeline.interop.book import book_config, to_book_state_dict
from pipeline.interop.formats import export
from pipeline.interop.hf_export import export_hf
from pipeline.interop.llmc import llmc_header, llmc_tensors
from pipeline.model import GPT, PRESETS, ModelConfig
from pipeline.training.checkpoint.folder import load_model
from pipeline.training.loop import train


@pytest.fixture(scope="module")
def run(sample_shards, tmp_path_factory) -> Path:
    """The tiny run of tests/helpers trained for 6 steps on FineWeb: a real checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    train(small_config(sample_shards, runs, eval_tokens=0))
    return runs / "run"


@pytest.fixture(scope="module")
def model(run) -> GPT:
    return load_model(run)[0]


def verdict_windows(shared_data: Path, block_size: int, count: int = 4) -> torch.Tensor:
    """`count` consecutive windows of real text (The Verdict, the book's own corpus): (count, T)."""
    ids = get_encoding().encode_ordinary((shared_data / "text" / "the-verdict.txt").read_text())
    return torch.tensor(ids[: count * block_size]).view(count, block_size)


def cli(*args: str) -> None:
    """`python -m pipeline.export ARGS` in this process, under the entry point's guard."""
    guard(export_main)(list(args))


# --------------------------------------------------------------------------- the book


def test_the_books_gpt_model_gives_our_logits_on_real_text(run, model, shared_data, tmp_path):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")  # make setup installs it (--no-deps)
    out = tmp_path / "book"
    cli("checkpoint", str(run), str(out), "--format", "book")
    # the README's lines
    cfg = json.loads((out / "config.json").read_text())
    book = ch04.GPTModel(cfg)
    book.load_state_dict(torch.load(out / "model.pth", weights_only=True))  # strict
    book.eval()

    assert cfg == {
        "vocab_size": 50257,
        "context_length": 64,
        "emb_dim": 32,
        "n_heads": 2,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": True,
    }
    assert isinstance(book.trf_blocks[0].norm1, ch04.LayerNorm)  # the book's own modules
    assert isinstance(book.trf_blocks[0].ff.layers[1], ch04.GELU)
    assert book.tok_emb.weight.shape == book.out_head.weight.shape == (50257, 32)
    x = verdict_windows(shared_data, model.cfg.block_size)  # (4, 64)
    with torch.no_grad():
        ours, _ = model(x, all_logits=True)  # (4, 64, 50304)
        theirs = book(x)  # (4, 64, 50257)
    difference = (theirs - ours[..., :50257]).abs().max().item()
    print(f"max |logit difference| book vs ours on The Verdict: {difference:.3g}")
    assert difference < 1e-4
    assert torch.equal(theirs.argmax(-1), ours[..., :50257].argmax(-1))


def test_sharp_random_weights_give_the_same_logits_too(shared_data, tmp_path):
    """Weights of std 0.3 everywhere (LayerNorms included) make attention far from uniform,
    so a query/key/value or layer mix-up changes the logits by much more than the tolerance."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    out = export(model, tmp_path / "book", "book")[0].parent
    book = ch04.GPTModel(json.loads((out / "config.json").read_text())).eval()
    book.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    x = verdict_windows(shared_data, 64, count=2)
    with torch.no_grad():
        torch.testing.assert_close(
            book(x), model(x, all_logits=True)[0][..., :50257], atol=1e-4, rtol=1e-5
        )


@pytest.mark.parametrize("preset", ["gpt2", "gpt2_xl"])
def test_real_gpt2_shapes_map_onto_the_books_model(preset):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    cfg = PRESETS[preset]
    with torch.device("meta"):  # shapes only, no memory
        theirs = ch04.GPTModel(book_config(cfg)).state_dict()
        mine = to_book_state_dict(GPT(cfg).state_dict(), cfg)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


def test_a_model_without_biases_gets_zero_biases_in_both_formats():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, bias=False)
    ours = GPT(cfg).state_dict()
    sd = to_book_state_dict(ours, cfg)
    for name in ("att.W_key.bias", "att.out_proj.bias", "ff.layers.0.bias", "norm2.shift"):
        assert torch.count_nonzero(sd[f"trf_blocks.0.{name}"]) == 0, name
    assert torch.equal(sd["trf_blocks.0.att.mask"], torch.ones(4, 4).triu(1))  # the book's
    assert sd["out_head.weight"].data_ptr() != sd["tok_emb.weight"].data_ptr()  # untied copy
    tensors = dict(llmc_tensors(ours, cfg))
    for name, rows in (("qkvb", 24), ("fcb", 32), ("ln2b", 8), ("lnfb", 8)):
        assert [tuple(p.shape) for p in tensors[name]] == [(rows,)], name  # one layer
        assert not any(torch.count_nonzero(p) for p in tensors[name]), name


# --------------------------------------------------------------------------- llm.c


LLMC_SHAPES = (
    "wte (Vp,C) wpe (T,C) ln1w (L,C) ln1b (L,C) qkvw (L,3C,C) qkvb (L,3C) "
    "attprojw (L,C,C) attprojb (L,C) ln2w (L,C) ln2b (L,C) fcw (L,4C,C) fcb (L,4C) "
    "fcprojw (L,C,4C) fcprojb (L,C) lnfw (C) lnfb (C)"
)
"""llm.c's ParameterTensors in file order (train_gpt2.c, fill_in_parameter_sizes)."""


def read_llmc(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(header, {name: array}) of a model.bin, read from llm.c's documented layout alone:
    256 int32 (magic, version, maxT, V, L, NH, C, Vp), then float32 tensors in LLMC_SHAPES
    order, then nothing."""
    data = path.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4")
    T, _, L, _, C, Vp = (int(v) for v in header[2:8])
    dims = {"Vp": Vp, "T": T, "L": L, "C": C, "3C": 3 * C, "4C": 4 * C}
    floats = np.frombuffer(data[1024:], dtype="<f4")
    tensors, offset = {}, 0
    for name, spec in re.findall(r"(\w+) \(([\w,]+)\)", LLMC_SHAPES):
        shape = tuple(dims[d] for d in spec.split(","))
        size = int(np.prod(shape))
        tensors[name] = floats[offset : offset + size].reshape(shape)
        offset += size
    assert offset == floats.size, "bytes left after lnfb"
    return header, tensors


def test_llmc_model_bin_holds_every_tensor_exactly(run, model, tmp_path, capsys):
    out = tmp_path / "llmc"
    cli("checkpoint", str(run), str(out), "--format", "llmc")
    assert capsys.readouterr().out.strip() == f"wrote {out / 'model.bin'}"
    header, got = read_llmc(out / "model.bin")
    assert header[:8].tolist() == [20240326, 3, 64, 50257, 2, 2, 32, 50304]
    assert not header[8:].any()
    sd, L = model.state_dict(), model.cfg.n_layer

    def ours(name: str) -> np.ndarray:
        if name.startswith("transformer.h."):  # stacked over layers: (L, ...)
            return np.stack([sd[name.replace("N", str(i), 1)].numpy() for i in range(L)])
        return sd[name].numpy()

    wte = sd["transformer.wte.weight"].numpy()  # (50304, 32); its padding rows are trained
    assert np.array_equal(got["wte"][:50257], wte[:50257])
    assert not got["wte"][50257:].any()  # llm.c's pad_vocab: zero rows
    expected = {
        "wpe": "transformer.wpe.weight",
        "lnfw": "transformer.ln_f.weight",
        "lnfb": "transformer.ln_f.bias",
    }
    expected |= {name: f"transformer.h.N.{key}" for name, key in llmc.LAYER_TENSORS}
    assert set(expected) | {"wte"} == set(got)
    for name, key in expected.items():
        assert np.array_equal(got[name], ours(key)), name


def test_llmc_layout_of_gpt2_124m_has_llmcs_parameter_count():
    cfg = PRESETS["gpt2"]
    with torch.device("meta"):
        tensors = llmc_tensors(GPT(cfg).state_dict(), cfg)
    assert sum(p.numel() for _, pieces in tensors for p in pieces) == 124_475_904
    assert llmc_header(cfg)[:8].tolist() == [20240326, 3, 1024, 50257, 12, 12, 768, 50304]


# --------------------------------------------------------------------------- failures


def test_a_missing_checkpoint_is_exit_2_in_one_line(tmp_path):
    result = run_module(
        "export", "checkpoint", str(tmp_path / "nothing"), str(tmp_path / "out"), "--format", "llmc"
    )
    assert result.returncode == USER_ERROR
    assert re.fullmatch(r"error: no complete checkpoint in .*\n", result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["book", "llmc"])
def test_an_output_path_that_is_a_file_is_exit_2_in_one_line(run, tmp_path, capsys, fmt):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        cli("checkpoint", str(run), str(tmp_path / "out"), "--format", fmt)
    assert info.value.code == USER_ERROR
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: export folder .* is a file, not a folder.*\n", err)
    assert (tmp_path / "out").read_text() == "not a folder"


def test_formats_do_not_mix_in_one_folder(model, tmp_path, capsys):
    out = export_hf(model, tmp_path / "hf")
    with pytest.raises(OutputError, match="holds an export in format hf"):
        export(model, out, "book")  # both write config.json
    with pytest.raises(SystemExit) as info:
        cli("checkpoint", "runs/x", str(out), "--format", "book", "--tokenizer-dir", "gpt2")
    assert info.value.code == USER_ERROR and "--format hf only" in capsys.readouterr().err


def test_a_failed_write_leaves_the_earlier_export_and_no_partial_file(
    model, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "llmc"
    export(model, out, "llmc")
    export(model, out / "book", "book")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def tensors_then_full(sd, cfg):  # llm.c: the disk fills after the first tensor
        yield "wte", [torch.zeros(1000, 8)]
        raise OSError(28, "No space left on device")

    def save_then_full(obj, f):  # the book: torch.save writes part of model.pth
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")

    monkeypatch.setattr(llmc, "llmc_tensors", tensors_then_full)
    monkeypatch.setattr(torch, "save", save_then_full)
    for fmt, folder in (("llmc", out), ("book", out / "book")):
        with pytest.raises(SystemExit) as info:
            guard(export)(model, folder, fmt)
        assert info.value.code == USER_ERROR
        assert re.fullmatch(
            r"error: writing .* failed: the disk is full.*\n", capsys.readouterr().err
        )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
