"""torch.profiler over a window of training steps: `profile.steps=N`.

Writes `<run_dir>/profile/trace.json` (Chrome trace format: open it in https://ui.perfetto.dev
or chrome://tracing) and `<run_dir>/profile/ops.txt` (the ops that took the most time, self
device time on CUDA, self CPU time otherwise). In the trace, gaps between GPU kernels are host
stalls; `cudaStreamSynchronize` / `cudaMemcpy` calls on the host row are synchronisations
(`.item()`, `.tolist()`, printing a tensor); `Torch-Compiled Region` entries that appear again
with compilation under them are recompilations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from pipeline.files import write_text_atomic

PROFILE_DIR = "profile"
OPS_ROWS = 40
"""Rows of the ops table."""


class StepProfiler:
    """Profiles `steps` optimizer steps of this process after skipping `start` of them and
    warming the profiler up on one more (torch.profiler's wait/warmup/active schedule), so
    compilation and the first steps are left out. Call `step()` once per optimizer step
    inside `with`. A no-op when steps == 0 or enabled is False (only the main process
    profiles). `done(message)` is called with where the files are once they are written;
    a run that ends inside the window writes the steps it profiled.
    """

    def __init__(
        self,
        steps: int,
        start: int,
        out_dir: Path,
        device: torch.device,
        enabled: bool = True,
        done: Callable[[str], None] = print,
    ):
        self.out_dir, self.device, self.done = Path(out_dir), device, done
        self.steps, self.start = steps, start
        self.prof: profile | None = None
        if steps > 0 and enabled:
            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(
                activities=activities,
                schedule=schedule(wait=start, warmup=1, active=steps, repeat=1),
                on_trace_ready=self._write,
            )

    def __enter__(self) -> StepProfiler:
        if self.prof is not None:
            self.prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.prof is not None:
            self.prof.__exit__(*exc)

    def step(self) -> None:
        """Mark the end of one optimizer step."""
        if self.prof is not None:
            self.prof.step()

    def _write(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace, ops = self.out_dir / "trace.json", self.out_dir / "ops.txt"
        prof.export_chrome_trace(str(trace))
        by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=by, row_limit=OPS_ROWS)
        write_text_atomic(
            ops,
            f"torch.profiler: optimizer steps {self.start + 2}..{self.start + 1 + self.steps} "
            f"of this process, on {self.device}, sorted by {by}\n{table}\n",
        )
        self.done(f"profile written: {trace} (open in https://ui.perfetto.dev), top ops in {ops}")
