"""Evaluation stage: `python -m pipeline.evaluate checkpoint=runs/<run_name>` (or pretrained=gpt2).

Tasks (`tasks=[val_loss,hellaswag]`, default `[val_loss]`):

- val_loss: the mean next-token cross-entropy (nats) over the fixed validation windows of
  `pipeline.data.loader.ValidationWindows` (the first eval_tokens tokens of the validation split
  in consecutive block_size + 1 windows), identical for every checkpoint; perplexity = exp(loss).
- hellaswag: completion-style HellaSwag accuracy, acc and acc_norm (see
  pipeline.scoring.hellaswag).

The model is a checkpoint (a run folder's newest by default) or, with `pretrained=`, OpenAI's GPT-2
weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 folder (see
pipeline.evaluation.loading). Results go to `<run_dir>/eval/<checkpoint name>.json` with a
Markdown table beside it (`.md`) and a table of all the run's evaluations,
`<run_dir>/eval/summary.md`; OpenAI weights to `runs/openai/eval/` (see
pipeline.evaluation.reports). Evaluating a checkpoint again on other tasks adds them to its
results (see keep_earlier_tasks).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import EvaluateConfig, as_dict
from pipeline.config.evaluate import eval_tokens_problems
from pipeline.data.loader import ValidationWindows
from pipeline.data.shards import MANIFEST, manifest_fingerprint, open_split
from pipeline.data.tokenizer import get_encoding
from pipeline.errors import ConfigError, ShardError, raise_if
from pipeline.evaluation.loading import Loaded, load_for_eval
from pipeline.evaluation.reports import TASKS, keep_earlier_tasks, write_reports
from pipeline.model import GPT
from pipeline.scoring.hellaswag import evaluate_hellaswag, load_items, resolve_path
from pipeline.scoring.loss import estimate_loss, perplexity
from pipeline.scoring.sampling import generate_text
from pipeline.training.runtime import (
    autocast_for,
    keep_freed_memory_on_cpu,
    resolve_device,
    resolve_precision,
)


def task_problems(cfg: EvaluateConfig) -> list[str]:
    """Problems of the fields `tasks`, `pretrained`, `hellaswag_limit` next to `checkpoint`,
    each with the fix."""
    out = []
    unknown = [t for t in _tasks(cfg) if t not in TASKS]
    if unknown:
        out.append(f"tasks: unknown {unknown}; choose among {list(TASKS)}, e.g. tasks=[val_loss]")
    if (_checkpoint(cfg) is None) == (cfg.pretrained is None):
        out.append(
            "set exactly one of checkpoint=runs/NAME (a checkpoint) and pretrained=gpt2 (OpenAI "
            "weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder)"
        )
    needs_data = "val_loss" in _tasks(cfg) and (cfg.shard_dir is None or not cfg.block_size)
    if cfg.pretrained is not None and needs_data:
        out.append(
            f"pretrained={cfg.pretrained} with the val_loss task needs shard_dir=shards/NAME and "
            "block_size=N (no checkpoint records them), or tasks=[hellaswag]"
        )
    if cfg.hellaswag_limit is not None and cfg.hellaswag_limit < 1:
        out.append(f"hellaswag_limit={cfg.hellaswag_limit} must be >= 1 or null (all items)")
    return out


def _checkpoint(cfg: EvaluateConfig) -> str | None:
    """cfg.checkpoint, None when unset or empty (`checkpoint=''`)."""
    return cfg.checkpoint or None


def _tasks(cfg: EvaluateConfig) -> list[str]:
    """cfg.tasks; an empty list means the default, [val_loss]."""
    return list(cfg.tasks) or ["val_loss"]


def window_size(cfg: EvaluateConfig, loaded: Loaded) -> int:
    """The val_loss task's block_size: block_size=, else the checkpoint's training block size,
    else the model's. Raises ConfigError when it exceeds the model's or eval_tokens holds no
    window of it."""
    data = (loaded.train_config or {}).get("data", {})
    limit = loaded.model.cfg.block_size
    block_size = cfg.block_size or data.get("block_size") or limit
    if block_size > limit:
        raise ConfigError([f"block_size={block_size} exceeds the model's block_size {limit}"])
    raise_if(eval_tokens_problems(cfg.eval_tokens, block_size))
    return block_size


def scored_data(cfg: EvaluateConfig, loaded: Loaded) -> Path:
    """The shard folder to score: shard_dir= when given; else the folder the checkpoint was
    trained on, which must still hold that data (same manifest fingerprint), found at its
    recorded absolute path or, for a checkpoint from another machine, at its data.shard_dir;
    an older checkpoint recording no fingerprint: its data.shard_dir as given. Raises
    ShardError saying which data differs and how to score it anyway."""
    if cfg.shard_dir:
        return Path(cfg.shard_dir)
    configured = (loaded.train_config or {}).get("data", {}).get("shard_dir")
    if not loaded.data:
        return Path(configured)
    recorded, expected = Path(loaded.data["shard_dir"]), loaded.data["manifest_fingerprint"]
    found = []  # (folder, fingerprint) of the candidates that exist
    for folder in dict.fromkeys([recorded, Path(configured or recorded).resolve()]):
        if (folder / MANIFEST).is_file():
            fingerprint = manifest_fingerprint(folder)
            if fingerprint == expected:
                return folder
            found.append(f"{folder} holds other data (manifest fingerprint {fingerprint[:12]})")
    raise ShardError(
        f"{loaded.source} was trained on {recorded} (manifest fingerprint {expected[:12]}), "
        f"but {'; '.join(found) or 'that folder is gone'}: restore that data, or pass "
        "shard_dir=<folder> to score other data deliberately"
    )


def val_loss_result(
    model: GPT, cfg: EvaluateConfig, loaded: Loaded, device: torch.device, autocast
) -> dict:
    """The val_loss task: val_loss (nats/token), perplexity, eval_tokens, windows, block_size,
    shard_dir (absolute) and manifest_fingerprint of the data scored (see scored_data).
    Raises ConfigError (block_size above the model's, eval_tokens below one window) or
    ShardError."""
    block_size = window_size(cfg, loaded)
    split = open_split(scored_data(cfg, loaded), "val", model.cfg.vocab_size)
    windows = ValidationWindows(split, block_size, cfg.eval_tokens, model.cfg.vocab_size)
    loss, tokens = estimate_loss(model, windows, cfg.micro_batch_size, device, autocast=autocast)
    return {
        "val_loss": loss,
        "perplexity": perplexity(loss),
        "eval_tokens": tokens,
        "windows": windows.num_windows,
        "block_size": block_size,
        **split.identity(),
    }


def hellaswag_result(model: GPT, cfg: EvaluateConfig, device: torch.device, autocast) -> dict:
    """The hellaswag task on `hellaswag_path` (default: downloaded, see
    pipeline.scoring.hellaswag), its first `hellaswag_limit` items, micro_batch_size items per
    pass: acc, acc_norm, n, path. Raises HellaSwagError."""
    path = resolve_path(cfg.hellaswag_path)
    items = load_items(path, cfg.hellaswag_limit)
    scores = evaluate_hellaswag(
        model, items, device, batch_items=cfg.micro_batch_size, autocast=autocast
    )
    return {**scores, "path": str(path)}


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate a checkpoint (or a run's newest, or GPT-2 weights with `pretrained=`) on each
    task of `cfg.tasks` (val_loss, hellaswag); write `<eval_dir>/<name>.json`, `<name>.md` and the
    folder's summary.md; return the result: checkpoint, step, tokens_seen, parameters, tasks,
    val_loss (nats/token), perplexity, eval_tokens, ... (val_loss task), hellaswag {acc,
    acc_norm, n, path} (hellaswag task), sample, path.

    Raises ConfigError, CheckpointError, ShardError, HellaSwagError, HFError or HubError with
    what to change.
    """
    raise_if(cfg.problems() + task_problems(cfg))
    tasks = _tasks(cfg)
    loaded = load_for_eval(_checkpoint(cfg), cfg.pretrained)
    device = resolve_device(cfg.cpu)
    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    model = loaded.model.to(device)
    precision = resolve_precision(cfg.precision, device)
    autocast = autocast_for(precision, device)
    result = {"checkpoint": loaded.source, "step": loaded.step, "tokens_seen": loaded.tokens_seen}
    if "val_loss" in tasks:
        result |= val_loss_result(model, cfg, loaded, device, autocast)
    result |= {
        "precision": precision,
        "evaluate_config": as_dict(cfg),
        "tasks": tasks,
        "parameters": model.num_params(),
    }
    if "hellaswag" in tasks:
        result["hellaswag"] = hellaswag_result(model, cfg, device, autocast)
    if cfg.sample_tokens:
        enc = get_encoding()
        result["sample"] = generate_text(
            model, enc, cfg.prompt, cfg.sample_tokens, device=device, seed=cfg.seed
        )
    out = loaded.eval_dir / f"{loaded.name}.json"
    result = keep_earlier_tasks(result, out)
    write_reports(result, out)
    result["path"] = str(out)
    return result
