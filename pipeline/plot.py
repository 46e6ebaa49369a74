"""`python -m pipeline.plot`: see pipeline.tools.plot."""

from __future__ import annotations

from pipeline.errors import guard
from pipeline.tools.plot import main

if __name__ == "__main__":
    guard(main)()
