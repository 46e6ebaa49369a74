"""BENCHMARKS.md: number formats, Markdown tables, device sections and how a run merges in.

The file keeps one section per device (and per tool), each between the markers
`<!-- bench:device KEY -->` and `<!-- bench:end -->`; a run replaces the section of its own
device and keeps the others. Within a section, each benchmark's part starts with its heading
`### NAME: ...`; a run of some benchmarks replaces only their parts (replace_parts).
"""

from __future__ import annotations

import datetime
import platform
import re
from dataclasses import dataclass, field

from pipeline.tools.host import Device, versions

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
    """A markdown table: the one way the tools render one. A `|` inside a cell (a compiler's
    error text in a preflight detail) is escaped so that it stays in its cell."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + " --- |" * len(header), *map(line, rows)])


@dataclass
class RunInfo:
    """What the header of a device section records about the run."""

    command: str
    started: datetime.datetime
    seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    versions: dict[str, str] = field(default_factory=versions)


def _load(info: RunInfo) -> str:
    return ", ".join(
        f"{' '.join(f'{x:.2f}' for x in la)} {when}"
        for la, when in ((info.load_before, "before"), (info.load_after, "after"))
    )


def render_section(device: Device, info: RunInfo, parts: list[str]) -> str:
    """A device section: marker, heading, run facts, then each benchmark's part."""
    load = _load(info)
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
END = "<!-- bench:end -->\n"
PART = re.compile(r"^### (?P<name>[\w-]+)", re.MULTILINE)
"""The heading that starts a benchmark's part of a device section."""


def run_note(info: RunInfo) -> str:
    """The line under the heading of a part measured in a run of some benchmarks: its date,
    command, duration and load, which the section's header (another run's) does not give."""
    return (
        f"Measured on its own: {info.started:%Y-%m-%d %H:%M %Z}, `{info.command}` "
        f"({info.seconds:,.0f} s), load average (1, 5, 15 min) {_load(info)}."
    )


def device_section(existing: str, key: str) -> str | None:
    """The section keyed `key` of an output file's text, None when it has none."""
    return next((m[0] for m in SECTION.finditer(existing) if m["key"] == key), None)


def replace_parts(section: str, parts: list[str], note: str) -> str:
    """`section` with each of `parts` in place of its part of the same benchmark (from its
    `### NAME` heading to the next one), or appended when it has none; each new part gets
    `note` as its first paragraph. The section's header and its other parts stay as they are."""
    head, *old = re.split(r"(?m)^(?=### )", section.removesuffix(END))
    chunks = {PART.match(c)["name"]: c.rstrip("\n") for c in old}
    for part in parts:
        heading, _, rest = part.partition("\n")
        chunks[PART.match(part)["name"]] = f"{heading}\n\n{note}\n{rest}".rstrip("\n")
    return head.rstrip("\n") + "\n\n" + "\n\n".join(chunks.values()) + "\n" + END


def merge_benchmarks(existing: str, key: str, section: str) -> str:
    """The output file with `section` in place of the section keyed `key` (a new one after the
    last section), everything else kept as it is (other devices' sections, and text written by
    hand between them), and the no-GPU note at the end while no GPU section exists."""
    text = existing.replace(NO_GPU, "").rstrip("\n") + "\n" if existing.strip() else HEADER
    old = device_section(text, key)
    if old is not None:
        text = text.replace(old, section, 1)
    else:
        last = list(SECTION.finditer(text))
        at = last[-1].end() if last else len(text)
        text = text[:at].rstrip("\n") + "\n\n" + section + text[at:]
    if not any(m["key"].startswith("gpu:") for m in SECTION.finditer(text)):
        text = text.rstrip("\n") + "\n\n" + NO_GPU
    return text
