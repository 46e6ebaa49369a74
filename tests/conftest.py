"""Shared fixtures: real data from `../shared/data` (or $SHARED_DATA), found without network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.env import use_shared_data
from helpers.paths import SHARED_DATA

use_shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: set SHARED_DATA to its path")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fineweb_sample(shared_data: Path) -> Path:
    """3,100 real FineWeb documents (parquet, column `text`)."""
    return Path(os.environ.get("FINEWEB_SAMPLE", shared_data / "fineweb/fineweb_sample.parquet"))


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, fineweb_sample: Path) -> Path:
    """Shards of the first 300 FineWeb sample documents (~200K tokens): a 20K-token
    validation split and train shards of 50K tokens, as the prepare stage writes them."""
    from pipeline.config import PrepareConfig, SourceConfig
    from pipeline.data.writer import prepare

    cfg = PrepareConfig(
        source=SourceConfig(
            name="sample", kind="local", paths=[str(fineweb_sample)], max_documents=300
        ),
        out_dir=str(tmp_path_factory.mktemp("shards")),
        shard_size=50_000,
        val_tokens=20_000,
        num_workers=1,
        progress=False,
    )
    return prepare(cfg)
