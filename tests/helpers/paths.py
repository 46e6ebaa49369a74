"""Where the repository and the shared data are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (the folder holding pipeline/, conf/ and tests/)."""
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
"""Real data the tests read without network: `../shared/data`, or $SHARED_DATA."""
