"""metrics.jsonl: one reader that skips a line cut off by a kill, and the resume truncation."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import DataError
from pipeline.training.runlog import METRICS, read_records, truncate

ROWS = [
    {"kind": "train", "step": 1, "loss": 5.0, "tokens_seen": 512},
    {"kind": "skip", "step": 2, "loss": float("nan"), "grad_norm": float("inf")},
    {"kind": "val", "step": 2, "loss": 4.9, "perplexity": 134.3, "tokens_seen": 1024},
    {"kind": "train", "step": 3, "loss": 4.8, "tokens_seen": 1536},
]


@pytest.fixture
def run_dir(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in ROWS) + '{"kind": "train", "st'  # killed
    (tmp_path / METRICS).write_text(text)
    return tmp_path


def test_reader_returns_complete_records_of_a_kind(run_dir):
    assert [r["step"] for r in read_records(run_dir)] == [1, 2, 2, 3]
    assert read_records(run_dir / METRICS, "train") == [ROWS[0], ROWS[3]]
    assert read_records(run_dir, "val") == [ROWS[2]]


def test_truncate_drops_the_steps_to_redo_and_the_cut_off_line(run_dir):
    truncate(run_dir, 3)
    assert (run_dir / METRICS).read_text().endswith("\n")
    assert [(r["kind"], r["step"]) for r in read_records(run_dir)] == [
        ("train", 1),
        ("skip", 2),
        ("val", 2),
    ]
    truncate(run_dir / "missing", 1)  # nothing to truncate
    assert not (run_dir / "missing").exists()


def test_a_line_that_is_not_a_record_is_a_data_error(run_dir):
    with (run_dir / METRICS).open("a") as f:  # appending after a cut-off line completes it
        f.write("\n")
    with pytest.raises(DataError, match=f"{METRICS}, line 5: not a metrics record"):
        read_records(run_dir)
    with pytest.raises(FileNotFoundError):
        read_records(run_dir / "other")
