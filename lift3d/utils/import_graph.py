"""The import graph of the lift3d package, read from source with ``ast`` (nothing is imported).

Used by ``tests/utils/test_import_layers.py`` to keep the layers acyclic, and runnable as
``python -m lift3d.utils.import_graph`` to print the package-level and module-level cycles.
Imports inside functions count: a deferred import that only dodges a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../lift3d


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. "lift3d.geometry.mesh"
    dst: str  # imported module
    line: int
    deferred: bool  # inside a function or method body


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` starts with (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


def _walk(tree: ast.AST):
    """Yield (import node, deferred) pairs; deferred when under a def or lambda."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, deferred = stack.pop()
        for child in ast.iter_child_nodes(node):
            d = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            stack.append((child, d))


def import_edges(root: Path = PACKAGE_ROOT) -> list[Edge]:
    """Every import of one lift3d module by another, top-level or deferred."""
    known = _modules(root)
    edges: list[Edge] = []
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, deferred in _walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import sub` names a submodule when one exists, else an attribute of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                dst = _resolve(t, known)
                if dst is not None and dst != mod:
                    edges.append(Edge(mod, dst, node.lineno, deferred))
    return sorted(set(edges), key=lambda e: (e.src, e.line, e.dst))


def package_of(module: str) -> str:
    """``lift3d.geometry.mesh`` -> ``geometry``; ``lift3d.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one node (Tarjan, iterative), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def module_graph(edges: list[Edge]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for e in edges:
        g.setdefault(e.src, set()).add(e.dst)
    return g


def package_graph(edges: list[Edge]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for e in edges:
        a, b = package_of(e.src), package_of(e.dst)
        if a != b:
            g.setdefault(a, set()).add(b)
    return g


def report(root: Path = PACKAGE_ROOT) -> str:
    edges = import_edges(root)
    lines: list[str] = []
    pkg_sccs = strongly_connected(package_graph(edges))
    lines.append(f"package-level cycles: {len(pkg_sccs)}")
    for comp in pkg_sccs:
        lines.append("  {" + ", ".join(comp) + "}")
        members = set(comp)
        for e in edges:
            a, b = package_of(e.src), package_of(e.dst)
            if a != b and a in members and b in members:
                kind = "deferred" if e.deferred else "top"
                lines.append(f"    {e.src}:{e.line} -> {e.dst} ({kind})")
    mod_sccs = strongly_connected(module_graph(edges))
    lines.append(f"module-level cycles: {len(mod_sccs)}")
    for comp in mod_sccs:
        lines.append("  {" + ", ".join(comp) + "}")
        members = set(comp)
        for e in edges:
            if e.src in members and e.dst in members:
                kind = "deferred" if e.deferred else "top"
                lines.append(f"    {e.src}:{e.line} -> {e.dst} ({kind})")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE_ROOT
    print(report(root))
