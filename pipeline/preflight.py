"""`python -m pipeline.preflight`: see pipeline.tools.preflight."""

from __future__ import annotations

import sys

from pipeline.errors import guard
from pipeline.tools.preflight import main

if __name__ == "__main__":
    sys.exit(guard(main)())
