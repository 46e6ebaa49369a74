"""BENCHMARKS.md: number formats, Markdown tables, device sections and how a run merges in.

The file keeps one section per device (and per tool), each between the markers
`<!-- bench:device KEY -->` and `<!-- bench:end -->`; a run replaces the section of its own
device and keeps the others.
"""

from __future__ import annotations

import datetime
import platform
import re
from dataclasses import dataclass, field

from pipeline.tools.bench.host import Device, versions

MIB = 1 << 20


def fmt_s(x: float) -> str:
    """Seconds: three decimals below 10, one above."""
    return f"{x:.3f}" if x < 10 else f"{x:,.1f}"


def fmt_n(x: float) -> str:
    """A rate: whole numbers from 100, three significant digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_mib(b: int | None) -> str:
    """Bytes in MiB, "n/a" for None."""
    return "n/a" if b is None else f"{b / MIB:,.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class RunInfo:
    """What the header of a device section records about the run."""

    command: str
    started: datetime.datetime
    seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    versions: dict[str, str] = field(default_factory=versions)


def render_section(device: Device, info: RunInfo, parts: list[str]) -> str:
    """A device section: marker, heading, run facts, then each benchmark's part."""
    load = ", ".join(
        f"{' '.join(f'{x:.2f}' for x in la)} {when}"
        for la, when in ((info.load_before, "before"), (info.load_after, "after"))
    )
    gpu = device.gpu or "none"
    facts = [
        f"- date: {info.started:%Y-%m-%d %H:%M %Z}",
        f"- device: {device.cpu} ({platform.machine()}), {device.cores} usable cores; GPU: {gpu}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in info.versions.items())}",
        f"- command: `{info.command}` ({info.seconds:,.0f} s)",
        f"- load average (1, 5, 15 min): {load}. The machine may be shared: figures vary "
        "between runs.",
    ]
    body = [f"## {device.title}", "", *facts, "", *("\n\n".join(parts).splitlines())]
    return f"<!-- bench:device {device.key} -->\n" + "\n".join(body) + "\n<!-- bench:end -->\n"


HEADER = """# Benchmarks

Measured throughput of each stage, written by `python -m pipeline.bench` (`make bench`), and the
optimizer comparison at tiny scale, written by `python -m pipeline.compare` (`make compare`).
There is one section per device and tool; a run replaces the section of its own device and
keeps the others.
"""
NO_GPU = """## GPU

No GPU was available for these measurements. Run `make bench` on a GPU machine to add its
section.
"""
SECTION = re.compile(r"<!-- bench:device (?P<key>.+?) -->\n.*?<!-- bench:end -->\n", re.DOTALL)


def merge_benchmarks(existing: str, key: str, section: str) -> str:
    """The output file with `section` in place of the section keyed `key` (appended when new),
    other device sections kept, and the no-GPU note while no GPU section exists."""
    sections = {m["key"]: m[0] for m in SECTION.finditer(existing)}
    sections[key] = section
    text = HEADER + "".join("\n" + s for s in sections.values())
    if not any(k.startswith("gpu:") for k in sections):
        text += "\n" + NO_GPU
    return text
