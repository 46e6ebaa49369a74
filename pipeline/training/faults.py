"""Fault injection for the crash-recovery tests: kill or poison a real run at a named point.

`PIPELINE_FAULT="<point>:<step>"` makes `inject(point, step)` act once the run reaches that
optimizer step (1-based, the step being computed):
  backward     SIGKILL after the gradients of the step are computed, before the optimizer
  optimizer    SIGKILL right after the optimizer step, before anything is logged or saved
  checkpoint   SIGKILL while writing checkpoint <step>, after model.pt, before the rename
  nan          returns True: the caller makes the step's loss NaN (one step, or a range a-b)
Unset, it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "PIPELINE_FAULT"


def _target() -> tuple[str, int, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, steps = spec.partition(":")
    first, _, last = steps.partition("-")
    return point, int(first), int(last or first)


def inject(point: str, step: int) -> bool:
    """Act on the fault named by PIPELINE_FAULT if it is `point` at `step`: kill the process
    (SIGKILL, no cleanup, as a crash or an OOM kill) or, for `nan`, return True."""
    target = _target()
    if target is None or target[0] != point or not target[1] <= step <= target[2]:
        return False
    if point == "nan":
        return True
    os.kill(os.getpid(), signal.SIGKILL)
    return False  # not reached
