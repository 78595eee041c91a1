"""The package's layers (``docs/architecture.md``): every import in ``lightning_ttp`` points down
or sideways, never up, and no two modules import each other, directly or around a loop.

Read from the source with ``ast`` (imports inside functions count: a lazy import that hides a
cycle is still a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ttp"
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}

#: layer of a module -> the layers it may import (its own included); "guards" is ``_modes``, the
#: pure-torch leaf that leaves the user's model untouched, which every layer's passes run inside
MAY_IMPORT = {
    "guards": set(),
    "math": {"guards", "math"},
    "pipeline": {"guards", "math", "pipeline"},
    "report": {"report"},
    "callbacks": {"guards", "math", "pipeline", "report", "callbacks"},
}
MATH = ("kernel", "dynamics", "spectral")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> str | None:
    """The layer of ``lightning_ttp.<...>`` (None: the package root, which re-exports lazily)."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if parts == ["_modes"]:
        return "guards"
    if parts[0] in MATH:
        return "math"
    if parts[0] in ("report", "callbacks"):
        return parts[0]
    return "pipeline"


def imports(module: str) -> tuple[set[str], set[str]]:
    """(the package's modules ``module`` imports, the top-level names of everything it imports)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    internal, tops = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            subs = [f"{stem}.{a.name}" for a in node.names if f"{stem}.{a.name}" in MODULES]
            names = subs if len(subs) == len(node.names) else [stem, *subs]  # "from . import x": x only
        else:
            continue
        for name in names:
            tops.add(name.split(".")[0])
            # a module's own ancestors are imported before it anyway: not an edge
            if name in MODULES and name != module and not module.startswith(name + "."):
                internal.add(name)
    return internal, tops


def test_the_layers_only_import_downwards():
    upward = []
    for module in MODULES:
        mine = layer(module)
        if mine is None:
            continue
        internal, tops = imports(module)
        for target in internal:
            theirs = layer(target)
            if theirs is None or theirs not in MAY_IMPORT[mine]:
                upward.append(f"{module} ({mine}) imports {target} ({theirs or 'the package root'})")
        if mine != "callbacks" and tops & LIGHTNING:
            upward.append(f"{module} ({mine}) imports Lightning ({sorted(tops & LIGHTNING)})")
    assert not upward, "imports against the layering of docs/architecture.md:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: imports(m)[0] for m in MODULES}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_what_it_guards(tmp_path, monkeypatch):
    """The two checks fail on a planted upward import and a planted cycle (a check that cannot fail
    guards nothing)."""
    fake = {"lightning_ttp.kernel.a": tmp_path / "a.py", "lightning_ttp.kernel.b": tmp_path / "b.py",
            "lightning_ttp.plan": tmp_path / "plan.py"}
    fake["lightning_ttp.kernel.a"].write_text("from ..plan import RunPlan\nfrom .b import x\n")
    fake["lightning_ttp.kernel.b"].write_text("def f():\n    from .a import y\n")
    fake["lightning_ttp.plan"].write_text("import lightning\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["MODULES"]), "MODULES", fake)
    for check in (test_the_layers_only_import_downwards, test_no_import_cycles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a planted violation")
