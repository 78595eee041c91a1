"""The package's layers (docs/architecture.md): no module imports a layer above its own, and no
two modules import each other, directly or around a loop.

Every import statement of every module is read with ``ast`` — at module level, inside functions
(lazy imports) and under ``TYPE_CHECKING`` alike: a lazy import hides a cycle from the
interpreter, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_ttp

PACKAGE = Path(lightning_ttp.__file__).resolve().parent

#: the layers, lowest first; a module may import its own layer and the layers of lower rank
RANKS = {"math": 0, "pipeline": 1, "report": 2, "api": 2, "callbacks": 3, "root": 4}
MATH = ("kernel", "dynamics", "spectral")
#: top-level distributions of the Lightning ecosystem: only the callbacks (and above) import them
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities"}


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in MATH:
        return "math"
    if parts[1] in ("pipeline", "callbacks", "report", "api"):
        return parts[1]
    raise AssertionError(f"{module} is in no layer: put it in a sub-package (docs/architecture.md)")


def imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for each import of ``module``: names of the package resolved to the
    module that defines them where that is a module (``from .x import y`` with ``y`` a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


def test_no_upward_imports():
    wrong = []
    for module in MODULES:
        here = layer(module)
        for target, line in imports(module):
            top = target.split(".")[0]
            if top in LIGHTNING and RANKS[here] < RANKS["callbacks"]:
                wrong.append(f"{module}:{line} imports {target} (Lightning is for the callbacks only)")
            elif target.startswith("lightning_ttp") and target in MODULES:
                there = layer(target)
                if there != here and RANKS[there] >= RANKS[here]:
                    wrong.append(f"{module}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_math_layers_do_not_import_each_other():
    """dynamics and spectral need no kernel engine and no model; the kernel needs neither of them."""
    wrong = [
        f"{m} imports {t}"
        for m, targets in graph().items()
        if layer(m) == "math"
        for t in targets
        if layer(t) == "math" and t.split(".")[1] != m.split(".")[1]
    ]
    assert not wrong, wrong


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(graph())
    assert not cycles, "modules that import each other (around a loop): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_cycles_and_lazy_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # a lazy import inside a function and a TYPE_CHECKING import are imports too
    lazy = {t for t, _ in imports("lightning_ttp.callbacks._report")}
    assert "lightning_ttp.report.plots" in lazy
