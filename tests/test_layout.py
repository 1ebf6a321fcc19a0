"""The package layout keeps its promises: no import cycles between modules, modules of a few hundred
lines, and the README's architecture sketch names every subpackage."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "nudges"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every nudges module this one imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nudges")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("nudges"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    return {name: {m for m in imports(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_relative_imports() -> None:
    """The cycle check would pass vacuously if it missed imports."""
    edges = graph()
    assert "nudges.engine" in edges["nudges.pipeline"]
    assert "nudges.fhir" in edges["nudges.record"]
    assert "nudges.runtime" in edges["nudges.api.deps"]


def test_modules_stay_small() -> None:
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {m: n for m, n in sizes.items() if n > 600}, "split modules over 600 lines"


def test_readme_architecture_names_every_subpackage() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sketch = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py")
                      if p.parent != PACKAGE and "migrations" not in p.parts)
    assert packages, "no subpackages found"
    missing = [p for p in packages if f"{p.rsplit('/', 1)[-1]}/" not in sketch]
    assert not missing, f"README architecture sketch does not show {missing}"
