"""The offline environment every test and every process a test starts runs in."""

from __future__ import annotations

import os

from helpers.paths import REPO, SHARED_DATA


def use_shared_data() -> None:
    """tiktoken reads the gpt2 vocabulary from the shared cache instead of downloading it; the
    Hugging Face libraries stay offline; W&B logs offline. Values already set win."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's (with use_shared_data applied), the
    repository importable from any working directory, and `extra` on top. Not the address of
    a W&B service an earlier test started in this process (WANDB_SERVICE): each command starts
    its own, as it does for a user."""
    use_shared_data()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "PYTHONPATH": str(REPO), **extra}
