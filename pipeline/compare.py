"""`python -m pipeline.compare`: see pipeline.tools.compare."""

from __future__ import annotations

from pipeline.errors import guard
from pipeline.tools.compare import main

if __name__ == "__main__":
    guard(main)()
