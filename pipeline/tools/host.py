"""The machine a benchmark runs on: where the data are, the device, versions, load and memory.

Memory in bytes, CPU time in seconds; Linux's /proc where it has it, `getrusage` elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.tokenizer import resolve_num_workers

REPO = Path(__file__).resolve().parents[2]
"""The repository: the working directory of the benchmark's child processes."""


def shared_data() -> Path:
    """$SHARED_DATA, else `../shared/data` beside the repository."""
    return Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def fineweb_sample() -> Path:
    """$FINEWEB_SAMPLE, else the FineWeb sample parquet file of the shared data."""
    default = shared_data() / "fineweb" / "fineweb_sample.parquet"
    return Path(os.environ.get("FINEWEB_SAMPLE", default)).resolve()


def set_data_environment() -> None:
    """Point tiktoken at the shared cache and keep `datasets` offline, unless already set."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_data() / "tiktoken_cache"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Device:
    """The machine measured: its section key in the output file and its description."""

    key: str
    title: str
    cpu: str
    cores: int
    gpu: str | None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_device() -> Device:
    """This machine: the GPU when CUDA is available, else the CPU and its usable cores."""
    cpu, cores = cpu_model(), resolve_num_workers(0)
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        return Device(f"gpu: {gpu}", f"GPU: {gpu}", cpu, cores, gpu)
    name = f"{cpu}, {cores} cores"
    return Device(f"cpu: {name}", f"CPU: {name}", cpu, cores, None)


def versions() -> dict[str, str]:
    """Versions of python and the packages the stages time."""
    out = {"python": platform.python_version()}
    for package in ("torch", "tiktoken", "numpy", "datasets", "accelerate"):
        out[package] = importlib.metadata.version(package)
    return out


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (0s where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def maxrss_bytes(who: int) -> int:
    """getrusage(who).ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(who).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def _proc_status_bytes(field_name: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes; None where there is no /proc."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        lines = Path("/proc/self/status").read_text().splitlines()
        line = next(ln for ln in lines if ln.startswith(field_name + ":"))
        return int(line.split()[1]) * 1024
    return None


def peak_rss_self() -> int:
    """Peak resident memory of this process's own address space in bytes: VmHWM on Linux.

    Not getrusage(RUSAGE_SELF).ru_maxrss: across fork + exec Linux carries the launching
    process's peak into it, so a fresh `python` started by a 2 GB process reports >= 2 GB.
    Elsewhere that ru_maxrss is the fallback."""
    return _proc_status_bytes("VmHWM") or maxrss_bytes(resource.RUSAGE_SELF)


def rss_self() -> int | None:
    """Current resident memory of this process in bytes (VmRSS), None where unknown."""
    return _proc_status_bytes("VmRSS")


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of getrusage(who)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
