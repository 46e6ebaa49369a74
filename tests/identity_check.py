"""The fixed-seed identity check: proof that a refactor left behaviour unchanged.

    python tests/identity_check.py OUT [--repo REPO] [--old-names]

runs, with one thread and the offline environment, from REPO (default: this checkout):
  prepare: source=local name=demo shard_size=1000000 val_tokens=250000
           source.shuffle_buffer=10000 (the FineWeb sample, $FINEWEB_SAMPLE)
  train:   experiment=demo, 12 steps, optim=adamw and optim=muon, warmup 2, validation on 4,096
           tokens and a checkpoint every 6 steps, no samples, a train record every step
and prints one line per figure (also written to OUT/identity.json): each shard's and the
manifest's sha256 (16 hex digits); per optimizer the sha256 of the (step, loss) train records of
metrics.jsonl, the validation loss at step 12, and the sha256 over step_0000012's model tensors
(each name and its raw bytes, in sorted name order; model.pt of a format-1 checkpoint, the DCP
files of a format-2 one, read through this checkout's pipeline.training.checkpoint.folder). Run
it on the tree before and the tree after a change, on the same machine, and compare: numerics
differ across CPUs in the 7th digit. --old-names uses the flat trainer.* keys of trees before the
config groups.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run(repo: Path, args: list[str]) -> None:
    shared = repo.parent / "shared" / "data"
    env = {
        "TIKTOKEN_CACHE_DIR": str(shared / "tiktoken_cache"),
        "FINEWEB_SAMPLE": str(shared / "fineweb" / "fineweb_sample.parquet"),
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(repo),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("WANDB_SERVICE", None)
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def weights_hash(checkpoint: Path) -> str:
    if (checkpoint / "model.pt").is_file():  # format 1, also of trees before format 2
        state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
    else:
        sys.path.insert(0, str(HERE))
        from pipeline.training.checkpoint.folder import model_tensors

        state = model_tensors(checkpoint)
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--repo", type=Path, default=HERE)
    p.add_argument("--old-names", action="store_true")
    a = p.parse_args()
    out, repo = a.out.resolve(), a.repo.resolve()
    run(
        repo,
        [
            "pipeline.prepare",
            "source=local",
            "name=demo",
            "shard_size=1000000",
            "val_tokens=250000",
            "source.shuffle_buffer=10000",
            f"out_dir={out / 'shards'}",
            "progress=false",
        ],
    )
    figures = {
        p.name: sha(p.read_bytes())
        for p in sorted((out / "shards" / "demo").iterdir())
        if p.suffix in (".bin", ".json") and not p.name.startswith(".")
    }
    names = (
        [
            "trainer.eval_interval=6",
            "trainer.eval_tokens=4096",
            "trainer.checkpoint_interval=6",
            "trainer.sample_tokens=0",
        ]
        if a.old_names
        else [
            "eval.interval=6",
            "eval.tokens=4096",
            "checkpoint.interval=6",
            "eval.sample_tokens=0",
        ]
    )
    for opt in ("adamw", "muon"):
        run(
            repo,
            [
                "pipeline.train",
                "experiment=demo",
                f"data.shard_dir={out / 'shards/demo'}",
                f"trainer.runs_dir={out / 'runs'}",
                f"trainer.run_name={opt}",
                f"optim={opt}",
                "trainer.max_steps=12",
                "optim.warmup_steps=2",
                "trainer.log_interval=1",
                *names,
            ],
        )
        records = [json.loads(line) for line in (out / "runs" / opt / "metrics.jsonl").open()]
        train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
        val = [r["loss"] for r in records if r["kind"] == "val" and r["step"] == 12]
        figures[f"{opt} train losses"] = sha(json.dumps(train).encode())
        figures[f"{opt} val loss, step 12"] = repr(val[-1])
        checkpoint = out / "runs" / opt / "checkpoints" / "step_0000012"
        figures[f"{opt} weights, step 12"] = weights_hash(checkpoint)
    (out / "identity.json").write_text(json.dumps(figures, indent=1))
    for k, v in figures.items():
        print(f"{k:28} {v}")


if __name__ == "__main__":
    main()
