"""`python -m pipeline.plan`: see pipeline.tools.plan."""

from __future__ import annotations

from pipeline.errors import guard
from pipeline.tools.plan import main

if __name__ == "__main__":
    guard(main)()
