"""The package's import graph has no circle (the layers only point down: boxes, images, store
at the bottom, the stage modules above them, cli on top).

Every import of every module counts, also those inside functions: a "lazy" import that
closes a circle still ties the two modules together (each needs the other to be understood,
tested or moved), it only hides the circle from Python's import machinery.
"""
from __future__ import annotations

import ast
from pathlib import Path

import rcnn_cli

PACKAGE = Path(rcnn_cli.__file__).parent


def module_name(path: Path) -> str:
    """``rcnn_cli/proposals/__init__.py`` -> ``rcnn_cli.proposals``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules that ``path`` (module ``name``) imports, anywhere in the file.

    ``from rcnn_cli import x`` names the module ``rcnn_cli.x`` when that is a module, else the
    package itself; relative imports are resolved against ``name``.
    """
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import rcnn_cli.proposals.x` -> the deepest module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    known = set(mods)
    return {m: imported_modules(p, m, known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_edges(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from rcnn_cli.runner import run_stage\n"
                   "    from rcnn_cli import store\n    import rcnn_cli.proposals.sliding\n")
    known = set(package_modules())
    assert imported_modules(src, "rcnn_cli.m", known) == {
        "rcnn_cli.runner", "rcnn_cli.store", "rcnn_cli.proposals.sliding"}


def test_graph_sees_the_package():
    graph = import_graph()
    assert "rcnn_cli.cli" in graph and "rcnn_cli.store" in graph["rcnn_cli.stages"]


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (each a set of modules that import each other):\n" + \
        "\n".join(" <-> ".join(c) for c in found)
