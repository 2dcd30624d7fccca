"""The package's layer rules (docs/architecture.md), enforced by walking every import.

An import goes down the table, never up or sideways, and nothing imports in a circle;
function-level (lazy) imports count like any other."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "bnfree_jax"

# package -> the packages of bnfree_jax it may import (besides itself)
ALLOWED = {
    "quant": set(),
    "intsim": set(),
    "data": set(),
    "nn": {"quant"},
    "train": {"nn", "quant", "data"},
    "distill": {"train", "nn", "quant", "data"},
    "export": {"nn", "quant"},
    "report": set(),
    "pipeline": {"quant", "intsim", "data", "nn", "train", "distill", "export", "report", "config_io"},
    "config_io": set(),
    "cli": {"pipeline"},
    "__init__": set(),
}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every bnfree_jax import in a file, lazy ones included."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "bnfree_jax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "bnfree_jax":
                continue
            for a in node.names:  # `from bnfree_jax import quant` imports the package quant
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if (ROOT.parent / full.replace(".", "/")).exists()
                            or (ROOT.parent / (full.replace(".", "/") + ".py")).exists() else base))
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def files():
    return sorted(ROOT.rglob("*.py"))


def test_every_package_is_in_the_table():
    assert {layer(module_name(p)) for p in files()} <= set(ALLOWED)


def test_imports_follow_the_layer_table():
    bad = []
    for path in files():
        me = layer(module_name(path))
        for line, target in imports_of(path):
            other = layer(target)
            if other != me and other not in ALLOWED[me]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {me} imports {target}")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    known = {module_name(p) for p in files()}
    graph = {}
    for path in files():
        me = module_name(path)
        graph[me] = {t for _, t in imports_of(path) if t in known and t != me}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """A list of modules forming a circle, or None."""
    state, stack = {}, []

    def visit(n):
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


def test_no_module_imports_in_a_circle():
    # A package's __init__ re-exporting its modules is not a circle through them.
    graph = {m: {t for t in ts if not (m.startswith(t + ".") )} for m, ts in _graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_can_fail(tmp_path):
    """The walker sees lazy and relative imports, and the cycle finder finds a circle."""
    f = ROOT / "report" / "_probe_for_test.py"
    assert not f.exists()
    f.write_text("def g():\n    from ..nn import zoo\n    import bnfree_jax.pipeline.context\n")
    try:
        got = [t for _, t in imports_of(f)]
    finally:
        f.unlink()
    assert got == ["bnfree_jax.nn.zoo", "bnfree_jax.pipeline.context"]
    assert {layer(t) for t in got} - ALLOWED["report"] == {"nn", "pipeline"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_doc_states_the_table(doc):
    text = (ROOT.parent / doc).read_text()
    for pkg, allowed in ALLOWED.items():
        if pkg in ("__init__", "config_io"):
            continue
        row = next((l for l in text.splitlines() if l.startswith(f"| `{pkg}") and "|" in l[2:]), None)
        assert row is not None, f"{doc} has no row for {pkg}"
        cell = row.split("|")[2]
        if "every package above" in cell:
            assert allowed >= set(ALLOWED) - {pkg, "cli", "__init__"}, (pkg, cell)
            continue
        named = {p for p in ALLOWED if f"`{p}" in cell}
        assert named == (allowed - {"config_io"}), (pkg, cell)
