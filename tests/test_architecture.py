"""The layers, as the README draws them, hold in the imports: ``loaded.core`` is
pure (nothing of io, daemon, control, lab), and no module imports one that
imports it back, however indirectly, function-level and type-checking imports
included (a cycle hidden inside a function is still a cycle to a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules ``path`` imports; ``from pkg import sub`` names ``pkg.sub`` alone
    (the package is then only being initialised, not depended on)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in modules else mod)
    return found


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        edges[name] = {m for m in _imports(path, name, set(files)) if m in files and m != name}
    return edges


def test_the_core_imports_no_outer_layer() -> None:
    outer = ("loaded.io", "loaded.daemon", "loaded.control", "loaded.lab", "loaded.cli",
             "loaded.replay")
    bad = {(a, b) for a, deps in graph().items() if a.startswith("loaded.core")
           for b in deps if b.startswith(outer)}
    assert not bad, sorted(bad)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycles.append([*path[path.index(m):], m])
            elif m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
