"""`python -m pipeline.plan`: see pipeline.tools.planning."""

from __future__ import annotations

from pipeline.errors import guard
from pipeline.tools.planning import main

if __name__ == "__main__":
    guard(main)()
