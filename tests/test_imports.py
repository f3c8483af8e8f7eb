"""The tiers of the package: imports go downward only, and there are no cycles.

Tiers, lowest first: ops -> backends -> nn -> models -> compat -> training ->
cli.  A module may import from its own tier and the tiers below it.  The
graph is read from the source (every ``import`` statement, also those inside
functions), so a lazy import cannot hide an upward edge.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "flax_minrnn"
TIERS = ["ops", "backends", "nn", "models", "compat", "training", "cli"]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _tier(module: str):
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package's __init__ (the curated API) sits on top
    head = parts[1]
    return head if head in TIERS else None


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "flax_minrnn":
                for alias in node.names:
                    yield f"flax_minrnn.{alias.name}"
            else:
                yield node.module


def _graph():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = {m for m in _imports(path)
                                     if m == "flax_minrnn" or m.startswith("flax_minrnn.")}
    return graph


def test_every_module_is_in_a_tier():
    for module in _graph():
        if module in ("flax_minrnn", "flax_minrnn.__main__"):
            continue
        assert _tier(module) is not None, f"{module} belongs to no tier of {TIERS}"


def test_imports_go_downward_only():
    bad = []
    for module, imports in _graph().items():
        tier = _tier(module)
        if tier is None:
            continue
        for target in imports:
            target_tier = _tier(target)
            if target == "flax_minrnn" or target_tier is None:
                bad.append(f"{module} imports {target} (the package root or no tier)")
            elif TIERS.index(target_tier) > TIERS.index(tier):
                bad.append(f"{module} ({tier}) imports {target} ({target_tier})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # Resolve "pkg.mod.name" imports of names to the module that defines them.
    def resolve(target):
        while target and target not in graph:
            target = target.rpartition(".")[0]
        return target

    edges = {m: {resolve(t) for t in ts} - {m, "", None} for m, ts in graph.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
