"""Faults from outside a run: the stop signals a scheduler sends before killing a job
(`StopSignal`), and fault injection for the crash-recovery tests, which kills or poisons a real
run at a named point.

`PIPELINE_FAULT="<point>:<step>"` makes `inject(point, step)` act once the run reaches that
optimizer step (1-based, the step being computed):
  backward     SIGKILL after the gradients of the step are computed, before the optimizer
  optimizer    SIGKILL right after the optimizer step, before anything is logged or saved
  checkpoint   SIGKILL while completing checkpoint <step>: after every process's tensors are
               written, before rng.pt, state.json and the rename
  stall        sleeps STALL_S seconds while completing checkpoint <step> (a slow disk: the
               save stays in flight while training goes on)
  mirror       SIGKILL while checkpoint <step> is uploaded to checkpoint.mirror, after its
               first file
  mirror_stall sleeps STALL_S seconds there (a slow upload)
  nan          returns True: the caller makes the step's loss NaN (one step, or a range a-b)
Unset, it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "PIPELINE_FAULT"
STALL_S = 3.0


def _target() -> tuple[str, int, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, steps = spec.partition(":")
    first, _, last = steps.partition("-")
    return point, int(first), int(last or first)


def inject(point: str, step: int) -> bool:
    """Act on the fault named by PIPELINE_FAULT if it is `point` at `step`: kill the process
    (SIGKILL, no cleanup, as a crash or an OOM kill), for `stall` sleep STALL_S seconds, or,
    for `nan`, return True."""
    target = _target()
    if target is None or target[0] != point or not target[1] <= step <= target[2]:
        return False
    if point == "nan":
        return True
    if point in ("stall", "mirror_stall"):
        time.sleep(STALL_S)
        return False
    os.kill(os.getpid(), signal.SIGKILL)
    return False  # not reached


class StopSignal:
    """Notes SIGTERM, SIGUSR1 or SIGUSR2, which cloud providers and SLURM send before killing a
    job (SIGUSR2: submitit's notice of a time limit or preemption, hydra/launcher=slurm), so the
    loop can finish its step, write a checkpoint and exit with pipeline.errors.PREEMPTED.
    A context manager: the previous handlers come back on exit (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: str | None = None
        """The name of the signal received (e.g. SIGTERM); None while there is none."""
        self.previous: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether this process has received a stop signal."""
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
