"""lm-evaluation-harness through `python -m pipeline.lm_eval`: a local task over real HellaSwag
items scored on a trained checkpoint, with lm-eval's accuracy checked against our own scorer;
results in the run's eval folder and summary.md; the export reused while the checkpoint is the
same; an unknown task or a missing lm-eval is one line and exit code 2."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers.proc import run_module
from helpers.tiny import small_config

from pipeline.config import EvaluateConfig
from pipeline.errors import USER_ERROR, guard
from pipeline.evaluation.reports import LM_EVAL, keep_earlier_lm_eval_tasks
from pipeline.evaluation.tasks import evaluate
from pipeline.interop.hf_export import SOURCE, export_cached
from pipeline.lm_eval import main as lm_eval_main
from pipeline.scoring.hellaswag import Item, evaluate_hellaswag
from pipeline.training.checkpoint.folder import list_checkpoints, load_model
from pipeline.training.loop import train

ITEMS, LIMIT = 8, 6
TASK = "hellaswag_local"
# lm-eval's hellaswag task (lm_eval/tasks/hellaswag/hellaswag.yaml) on klosax's items, whose text
# is already cleaned the way that task's process_docs cleans it; the data is a local JSON file.
TASK_YAML = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: DATA
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{activity_label}}: {{ctx}}"
doc_to_target: label
doc_to_choice: endings
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def items(shared_data) -> list[dict]:
    """The first ITEMS HellaSwag validation items (klosax's JSON lines)."""
    path = shared_data / "hellaswag" / "hellaswag_val_klosax.jsonl"
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(ITEMS)]


@pytest.fixture(scope="module")
def task_yaml(items, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    path = folder / f"{TASK}.yaml"
    path.write_text(TASK_YAML.replace("DATA", str(data)))
    return path


@pytest.fixture(scope="module")
def run_dir(sample_shards, tmp_path_factory) -> Path:
    """A tiny GPT-2 trained for 4 steps on real FineWeb tokens, checkpoints at 2 and 4."""
    runs = tmp_path_factory.mktemp("runs")
    train(small_config(sample_shards, runs, max_steps=4, checkpoint_interval=2, eval_tokens=0))
    return runs / "run"


@pytest.mark.slow
def test_a_local_hellaswag_task_scores_the_newest_checkpoint(run_dir, task_yaml, items):
    done = run_module(
        "lm_eval",
        str(run_dir),
        "--tasks",
        str(task_yaml),
        "--limit",
        str(LIMIT),
        "--batch-size",
        "8",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "eval" / f"step_0000004{LM_EVAL}").read_text())
    assert record["step"] == 4 and record["export"] == str(run_dir / "hf_export")
    entry = record["tasks"][TASK]
    counts = (entry["samples"], entry["of"], entry["num_fewshot"], entry["limit"])
    assert counts == (LIMIT, ITEMS, 0, LIMIT)
    acc, acc_norm = entry["metrics"]["acc"], entry["metrics"]["acc_norm"]
    assert 0 <= acc["value"] <= 1 and 0 <= acc_norm["value"] <= 1
    assert acc["stderr"] is not None and acc_norm["stderr"] is not None
    # lm-eval's acc is the most likely ending, as our scorer's: the same on the same text
    model, _, _ = load_model(run_dir)
    prompts = [f"{r['activity_label']}: {r['ctx']}" for r in items[:LIMIT]]
    ours = evaluate_hellaswag(
        model, [Item(p, tuple(r["endings"]), r["label"]) for p, r in zip(prompts, items)]
    )
    assert acc["value"] == pytest.approx(ours["acc"])
    row = f"| {TASK} | acc | {acc['value']:.4f} | {acc['stderr']:.4f} | 0 | {LIMIT} of {ITEMS} |"
    assert row in done.stdout
    # the validation loss evaluated afterwards: summary.md holds both
    evaluate(EvaluateConfig(checkpoint=str(run_dir), eval_tokens=2048, sample_tokens=0))
    summary = (run_dir / "eval" / "summary.md").read_text()
    assert "| step_0000004 | 4 | 2,048 |" in summary
    assert "### step_0000004 (lm-eval 0.4" in summary and row in summary


def test_the_export_is_reused_for_the_same_checkpoint_only(run_dir, capsys):
    step2, step4 = list_checkpoints(run_dir)
    out, ckpt, state = export_cached(step2)
    assert ckpt == step2 and state["step"] == 2
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert json.loads((out / SOURCE).read_text())["step"] == 2
    again, _, _ = export_cached(step2)
    assert again == out and (out / "model.safetensors").stat().st_mtime_ns == written
    assert "reusing" in capsys.readouterr().out
    export_cached(run_dir)  # the newest: step 4 replaces it
    assert json.loads((out / SOURCE).read_text())["step"] == 4
    assert not (run_dir / ".hf_export.tmp").exists()


def test_a_task_run_again_replaces_only_its_own_entry(tmp_path):
    base = {"checkpoint": "c", "step": 2, "model_sha256": "ab"}
    first = {**base, "tasks": {"a": {"metrics": {}, "samples": 1}, "b": {"metrics": {}}}}
    out = tmp_path / f"step_0000002{LM_EVAL}"
    out.write_text(json.dumps(first))
    second = {**base, "tasks": {"b": {"metrics": {}, "samples": 9}}}
    assert keep_earlier_lm_eval_tasks(second, out)["tasks"] == {
        "a": {"metrics": {}, "samples": 1},
        "b": {"metrics": {}, "samples": 9},
    }
    other = {**second, "model_sha256": "cd"}  # another checkpoint of that name: nothing kept
    assert keep_earlier_lm_eval_tasks(other, out) == other


def test_an_unknown_task_is_one_line_and_exit_2(run_dir, task_yaml, capsys):
    with pytest.raises(SystemExit) as info:
        guard(lm_eval_main)([str(run_dir), "--tasks", f"{task_yaml},no_such_task"])
    assert info.value.code == USER_ERROR
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: unknown lm-eval task 'no_such_task': .*", err)


def test_without_lm_eval_the_error_says_how_to_install_it(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(SystemExit) as info:
        guard(lm_eval_main)([str(run_dir)])
    assert info.value.code == USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lm-evaluation-harness is not installed") and "\n" not in err
    assert err.endswith("pip install -e '.[eval]'")
