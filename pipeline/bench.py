"""`python -m pipeline.bench`: see pipeline.tools.bench."""

from __future__ import annotations

from pipeline.errors import guard
from pipeline.tools.bench import main

if __name__ == "__main__":
    guard(main)()
