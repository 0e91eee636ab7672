"""Pieces programs share live in the library: the library never imports a program, and the dense
program's modules import each other without cycles (every import counts, also function-level ones)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fvlm"
LIBRARY = ("fvlm.encoders", "fvlm.losses", "fvlm.models", "fvlm.data", "fvlm.taxonomy", "fvlm.train")
PROGRAMS = ("fvlm.xray", "fvlm.dense", "fvlm.commands", "fvlm.demo", "fvlm.cli")


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fvlm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("fvlm"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


GRAPH = {_module(p): _imports(p) for p in PKG.rglob("*.py")}


@pytest.mark.parametrize("lib", LIBRARY)
def test_the_library_never_imports_a_program(lib):
    bad = sorted((m, t) for m, ts in GRAPH.items() if m == lib or m.startswith(lib + ".")
                 for t in ts if t.startswith(PROGRAMS))
    assert not bad, bad


def test_dense_modules_have_no_import_cycle():
    dense = {m: {t for t in ts if t in GRAPH and t.startswith("fvlm.dense.")} for m, ts in GRAPH.items()
             if m.startswith("fvlm.dense.")}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in dense.get(m, ()):
            assert state.get(t) != 1, " -> ".join(stack + [m, t])
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in dense:
        if m not in state:
            visit(m, [])
    assert "fvlm.dense.cases" in dense


def test_graph_sees_function_level_imports():
    # the check above would pass vacuously if lazy imports were missed
    assert "fvlm.models.dense" in GRAPH["fvlm.dense.train"]
    assert "fvlm.encoders.vit" in GRAPH["fvlm.losses.mae"]
