"""The folder tree is the architecture: these tests hold the package to its layers, read from
the source itself (every `import` and `from ... import`, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_LINES = 500

ENTRY_POINTS = {
    "prepare",
    "train",
    "evaluate",
    "sample",
    "export",
    "hub",
    "plan",
    "plot",
    "bench",
    "compare",
    "lm_eval",
    "preflight",
}
"""`python -m pipeline.<name>`: thin, and none imports another."""

BASE = ("pipeline.errors", "pipeline.files", "pipeline.config", "pipeline.model")
LAYERS = {
    "pipeline.errors": (),
    "pipeline.files": ("pipeline.errors",),
    "pipeline.model": ("pipeline.errors",),
    "pipeline.config": ("pipeline.errors", "pipeline.model", "pipeline.config"),
    "pipeline.data": (*BASE, "pipeline.data"),
    # how a model is scored: what training's validation and the evaluation stage share
    "pipeline.scoring": (*BASE, "pipeline.data", "pipeline.scoring"),
    "pipeline.training": (*BASE, "pipeline.data", "pipeline.scoring", "pipeline.training"),
    "pipeline.interop": (*BASE, "pipeline.data", "pipeline.training", "pipeline.interop"),
    "pipeline.evaluation": (*BASE, "pipeline.data", "pipeline.scoring", "pipeline.training",
                            "pipeline.interop", "pipeline.evaluation"),
    "pipeline.tools": (*BASE, "pipeline.data", "pipeline.scoring", "pipeline.training",
                       "pipeline.interop", "pipeline.evaluation", "pipeline.tools"),
}  # fmt: skip
"""What each part of the package may import from the project, lowest layer first."""


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def project_imports(path: Path) -> set[str]:
    """The pipeline modules a file imports (absolute imports; the project uses no others)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline")
        ):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline import x`
    return found


def allowed(importer: str, imported: str) -> bool:
    if importer.split(".")[-1] in ENTRY_POINTS and importer.count(".") == 1:
        target = imported.split(".")
        return not (len(target) >= 2 and target[1] in ENTRY_POINTS and len(target) == 2)
    layer = next(
        k
        for k in sorted(LAYERS, key=len, reverse=True)
        if importer == k or importer.startswith(k + ".")
    )
    return any(imported == ok or imported.startswith(ok + ".") for ok in LAYERS[layer])


def existing(name: str) -> bool:
    """Whether a dotted name is a module of the package (not a function imported from one)."""
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (
        PACKAGE.parent / rel / "__init__.py"
    ).is_file()


@pytest.mark.parametrize("name,path", modules(), ids=[n for n, _ in modules()])
def test_module_imports_only_its_own_layer_and_below(name: str, path: Path):
    wrong = sorted(m for m in project_imports(path) if existing(m) and not allowed(name, m))
    assert wrong == [], f"{name} imports {wrong}"


@pytest.mark.parametrize("name,path", modules(), ids=[n for n, _ in modules()])
def test_no_module_is_over_500_lines(name: str, path: Path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_entry_points_are_thin():
    """Each stage parses its config or arguments and calls its library: no more than a page."""
    for name in ENTRY_POINTS:
        lines = (PACKAGE / f"{name}.py").read_text().splitlines()
        assert len(lines) <= 80, f"pipeline/{name}.py has {len(lines)} lines"
        assert "guard" in "\n".join(lines), f"pipeline/{name}.py does not use errors.guard"


def test_every_package_file_is_a_module_of_a_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == ENTRY_POINTS | {"errors", "files", "model"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "config",
        "data",
        "scoring",
        "training",
        "evaluation",
        "interop",
        "tools",
    }


def test_no_modules_import_each_other_in_a_circle():
    """The import graph of the package (imports inside functions included) has no cycle: each
    module can be read, and tested, before the ones that import it."""
    names = dict(modules())
    graph = {
        n: sorted(m for m in project_imports(p) if m in names and m != n) for n, p in names.items()
    }
    done, path, circles = set(), [], []

    def visit(name: str) -> None:
        if name in path:
            circles.append(path[path.index(name) :] + [name])
            return
        if name in done:
            return
        path.append(name)
        for imported in graph[name]:
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)
