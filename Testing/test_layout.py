"""The package layout: no import cycles, imports only downward, compat shims in place.

Parses every module of ``PancreasC2FLib/`` and ``Training/`` with ``ast`` (imports inside functions
included) and checks the import graph between the project's own modules.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("PancreasC2FLib", "Training")
# The library never depends on Slicer, its GUI toolkits or the training code.
FORBIDDEN_IN_LIBRARY = ("slicer", "qt", "ctk", "vtk", "Training")
# subpackage -> subpackages of PancreasC2FLib it must not import
LAYERS = {
    "networks": ("pipelines", "apps", "synthetic", "io"),
    "io": ("pipelines", "apps", "synthetic"),
    "processing": ("pipelines", "apps", "synthetic"),
    "pipelines": ("apps",),
    "synthetic": ("apps", "pipelines"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts}


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute, resolved relative, ``from X import y`` gives
    X and X.y: y may be a submodule)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def project_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        for target in imported_names(name, path):
            # the deepest project module the name refers to (X.y where y is a function -> X)
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "PancreasC2FLib" and len(parts) > 2 else None


def test_imports_only_downward():
    bad = []
    for name, targets in project_graph().items():
        layer = subpackage(name)
        for target in targets:
            if subpackage(target) in LAYERS.get(layer, ()):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_library_never_imports_slicer_qt_or_training():
    bad = []
    for name, path in modules().items():
        if not name.startswith("PancreasC2FLib"):
            continue
        for target in imported_names(name, path):
            top = target.split(".")[0]
            if top in FORBIDDEN_IN_LIBRARY:
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_a_layering_violation_is_caught(tmp_path):
    """The graph sees a relative import that goes up a layer (the check the tests above rely on)."""
    path = ROOT / "PancreasC2FLib" / "networks" / "resdsn.py"
    fake = tmp_path / "resdsn.py"
    fake.write_text(path.read_text(encoding="utf-8") + "\nfrom ..apps import cli\n", encoding="utf-8")
    assert "PancreasC2FLib.apps.cli" in imported_names("PancreasC2FLib.networks.resdsn", fake)


@pytest.mark.parametrize("module, attr", [("PancreasC2FLib.pipeline", "create_pipeline"), ("PancreasC2FLib.cli", "main")])
def test_compat_shims(module, attr):
    assert callable(getattr(importlib.import_module(module), attr))


def test_io_subpackage_importable():
    from PancreasC2FLib import io as lib_io

    assert lib_io.__name__ == "PancreasC2FLib.io"
    import io  # the standard library's stays what it is

    assert hasattr(io, "BytesIO")
