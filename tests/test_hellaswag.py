"""HellaSwag on the real validation items: both file layouts, the default file's atomic
download, scores checked against direct model calls, independence from batching, sharding and
compilation, and the evaluate stage's JSON and Markdown reports."""

from __future__ import annotations

import io
import json
import math
import os
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import small_config

from pipeline.config import EvaluateConfig
from pipeline.data.tokenizer import get_encoding
from pipeline.errors import HellaSwagError
from pipeline.evaluation.reports import read_results
from pipeline.evaluation.tasks import evaluate
from pipeline.model import GPT, ModelConfig
from pipeline.scoring.hellaswag import (
    Item,
    candidate_losses,
    encode_item,
    evaluate_hellaswag,
    load_items,
    resolve_path,
)
from pipeline.training.checkpoint.folder import list_checkpoints
from pipeline.training.loop import train

# The first validation item as rowanz/hellaswag's hellaswag_val.jsonl has it (the example row
# quoted in llm.c dev/data/hellaswag.py).
UPSTREAM_ROW = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "split": "val",
    "split_type": "indomain",
    "label": 3,
    "endings": [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}


@pytest.fixture(scope="module")
def klosax(shared_data) -> list[Item]:
    """The first 40 of the 10,042 validation items (klosax's JSON-lines conversion)."""
    return load_items(shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl", limit=40)


@pytest.fixture(scope="module")
def model() -> GPT:
    """A random-weight GPT whose 64-token window left-cuts the longer items' contexts."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def test_loader_reads_the_upstream_and_klosax_layouts(shared_data, tmp_path, klosax):
    second = {"ind": 92, "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole."}
    second |= {"ctx_b": "the lady", "label": 3, "endings": list(klosax[1].endings)}  # no "ctx"
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(UPSTREAM_ROW) + "\n\n" + json.dumps(second) + "\n")
    upstream = load_items(path)
    assert [i.layout for i in upstream] == ["upstream", "upstream"]
    assert [(i.ctx, i.endings, i.label) for i in upstream] == [
        (k.ctx, k.endings, k.label) for k in klosax[:2]
    ]
    assert len(klosax) == 40 and {i.layout for i in klosax} == {"klosax"}
    assert all(len(i.endings) == 4 and 0 <= i.label <= 3 for i in klosax)
    full = shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl"
    assert len(load_items(full)) == 10_042


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"ctx": "c", "endings": ["a", "b", "c", "d"]}', "line 2: missing field 'label'"),
        ('{"ctx": "c", "endings": ["a", "b"], "label": 0}', "line 2: endings must be"),
        ('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 4}', "line 2: label must be"),
    ],
)
def test_malformed_lines_are_named_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(UPSTREAM_ROW) + "\n" + line + "\n")
    with pytest.raises(HellaSwagError, match=f"bad.jsonl, {message}"):
        load_items(path)
    with pytest.raises(HellaSwagError, match="does not exist"):
        load_items(tmp_path / "missing.jsonl")


def test_the_default_file_is_downloaded_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "gpt2-fineweb-pipeline" / "hellaswag"

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(HellaSwagError, match="without network pass the file"):
        resolve_path(None)
    assert list(folder.iterdir()) == []  # no partial download left behind
    row = (json.dumps(UPSTREAM_ROW) + "\n").encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(row))
    path = resolve_path(None)
    assert path == folder / "hellaswag_val.jsonl" and os.listdir(folder) == [path.name]
    assert load_items(path)[0].label == 3 and resolve_path(str(path)) == path


def direct_losses(model: GPT, item: Item) -> tuple[list[float], list[float]]:
    """Summed and mean loss of each ending, one plain forward pass per ending, unpadded."""
    enc = get_encoding()
    ctx = enc.encode(item.ctx)
    sums, means = [], []
    for ending in item.endings:
        end = enc.encode(" " + ending)
        row = torch.tensor((ctx + end)[-(model.cfg.block_size + 1) :])
        with torch.no_grad():
            logits, _ = model(row[None, :-1], all_logits=True)
        logp = F.log_softmax(logits[0, :, : model.cfg.vocab_size], dim=-1)  # (T, vocab_size)
        token_losses = -logp[-len(end) :].gather(1, row[-len(end) :, None])  # ending tokens
        sums.append(token_losses.sum().item())
        means.append(token_losses.mean().item())
    return sums, means


def test_scores_match_a_direct_computation(model, klosax):
    items = klosax[:4]
    enc = get_encoding()
    batch = [encode_item(i, enc.encode_ordinary, model.cfg.block_size + 1) for i in items]
    sums, means = candidate_losses(model, batch)  # (4, 4) each, one padded forward pass
    right = [0, 0]
    for k, item in enumerate(items):
        direct_sum, direct_mean = direct_losses(model, item)
        torch.testing.assert_close(sums[k], torch.tensor(direct_sum), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(means[k], torch.tensor(direct_mean), rtol=1e-4, atol=1e-5)
        right[0] += min(range(4), key=direct_sum.__getitem__) == item.label
        right[1] += min(range(4), key=direct_mean.__getitem__) == item.label
    scores = evaluate_hellaswag(model, items, batch_items=3)
    assert scores == {"acc": right[0] / 4, "acc_norm": right[1] / 4, "n": 4}


def test_batching_and_sharding_do_not_change_the_scores(model, klosax):
    items = klosax[:12]
    one = evaluate_hellaswag(model, items, batch_items=1)
    assert one["n"] == 12 and 0 <= one["acc"] <= 1 and 0 <= one["acc_norm"] <= 1
    assert evaluate_hellaswag(model, items, batch_items=6) == one
    # five ranks of a job: 12 items = 3 + 3 + 2 + 2 + 2, ranks 2-4 repeating one item with
    # weight 0 so that every rank runs the same forward passes; counts summed over ranks
    calls, passes, ranks = [], [], []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    for rank in range(5):
        ranks.append(evaluate_hellaswag(model, items, batch_items=2, rank=rank, world_size=5))
        passes.append(len(calls) - sum(passes))
    hook.remove()
    assert [r["n"] for r in ranks] == [3, 3, 2, 2, 2] and passes == [2] * 5
    assert sum(r["acc"] * r["n"] for r in ranks) == pytest.approx(one["acc"] * 12)
    assert sum(r["acc_norm"] * r["n"] for r in ranks) == pytest.approx(one["acc_norm"] * 12)


def test_a_compiled_model_scores_like_the_eager_one(model, klosax):
    items = klosax[:4]
    compiled = torch.compile(model, backend="eager")  # graph capture only: fast on a CPU
    assert evaluate_hellaswag(compiled, items, batch_items=3) == evaluate_hellaswag(
        model, items, batch_items=3
    )


@pytest.mark.slow
def test_200_items_on_two_ranks(model, shared_data):
    items = load_items(shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl", limit=200)
    whole = evaluate_hellaswag(model, items, batch_items=8)
    assert whole["n"] == 200 and 0.15 < whole["acc_norm"] < 0.35  # random weights: chance
    counts = [0.0, 0.0]
    for rank in (0, 1):
        r = evaluate_hellaswag(model, items, batch_items=8, rank=rank, world_size=2)
        counts = [counts[0] + r["acc"] * r["n"], counts[1] + r["acc_norm"] * r["n"]]
    assert counts == pytest.approx([whole["acc"] * 200, whole["acc_norm"] * 200])


def test_evaluate_writes_both_tasks_and_markdown_reports(sample_shards, shared_data, tmp_path):
    train(small_config(sample_shards, tmp_path, max_steps=2, checkpoint_interval=1, eval_tokens=0))
    run_dir = tmp_path / "run"
    step1, step2 = list_checkpoints(run_dir)
    path = str(shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl")
    cfg = EvaluateConfig(
        checkpoint=str(step2),
        tasks=["val_loss", "hellaswag"],
        hellaswag_path=path,
        hellaswag_limit=20,
        eval_tokens=2048,
        sample_tokens=0,
    )
    r = evaluate(cfg)
    saved = json.loads((run_dir / "eval" / "step_0000002.json").read_text())
    assert saved["val_loss"] == r["val_loss"] and saved["tasks"] == ["val_loss", "hellaswag"]
    assert saved["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    hs = saved["hellaswag"]
    assert hs["n"] == 20 and 0 <= hs["acc"] <= 1 and 0 <= hs["acc_norm"] <= 1
    table = (run_dir / "eval" / "step_0000002.md").read_text()
    for number in (f"{r['val_loss']:.4f}", f"{hs['acc']:.4f}", f"{hs['acc_norm']:.4f}"):
        assert f"| {number} |" in table
    assert "| tokens trained | 1,024 |" in table and "| HellaSwag items | 20 |" in table
    # the earlier checkpoint, validation loss only: a second row of the run's summary
    early = evaluate(EvaluateConfig(checkpoint=str(step1), eval_tokens=2048, sample_tokens=0))
    assert "hellaswag" not in early and (run_dir / "eval" / "step_0000001.md").is_file()
    assert list(read_results(run_dir / "eval")) == ["step_0000001", "step_0000002"]
    summary = (run_dir / "eval" / "summary.md").read_text().splitlines()
    rows = [line for line in summary if line.startswith("| step_")]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| step_0000001", "1", "512"],
        ["| step_0000002", "2", "1,024"],
    ]
    assert f"| {early['val_loss']:.4f} |" in rows[0] and rows[0].endswith("| – | – | – |")
    assert rows[1].endswith(f"| {hs['acc']:.4f} | {hs['acc_norm']:.4f} | 20 |")
    # HellaSwag alone on the earlier checkpoint keeps its validation loss
    cfg = EvaluateConfig(
        checkpoint=str(step1),
        tasks=["hellaswag"],
        hellaswag_path=path,
        hellaswag_limit=10,
        eval_tokens=2048,
        sample_tokens=0,
    )
    both = evaluate(cfg)
    assert both["tasks"] == ["val_loss", "hellaswag"] and both["hellaswag"]["n"] == 10
    assert both["val_loss"] == early["val_loss"] and both["eval_tokens"] == early["eval_tokens"]
    saved = json.loads((run_dir / "eval" / "step_0000001.json").read_text())
    assert saved["val_loss"] == early["val_loss"] and saved["hellaswag"]["n"] == 10
