"""Counts for the house style (docs/DEVELOPING.md): imports inside functions and functions of 80+ lines.

    python scripts/code_stats.py [-v]     # -v: list the project's own imports that sit inside functions

Reads fvlm/ and preprocess/ as text (nothing is imported or run).
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = ("fvlm", "preprocess")
LONG = 80


def _is_own(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] in OWN
    return any(a.name.split(".")[0] in OWN for a in node.names)


def scan(path: Path, rel: str, counts: dict, own_inside: list, long_fns: list) -> None:
    def walk(node: ast.AST, in_function: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.Import, ast.ImportFrom)):
                counts["imports"] += 1
                if in_function:
                    counts["inside"] += 1
                    if _is_own(ch):
                        own_inside.append(f"{rel}:{ch.lineno} {ast.unparse(ch)}")
            is_fn = isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_fn and ch.end_lineno - ch.lineno + 1 >= LONG:
                long_fns.append(f"{rel}:{ch.lineno} {ch.name} ({ch.end_lineno - ch.lineno + 1} lines)")
            walk(ch, in_function or is_fn)

    walk(ast.parse(path.read_text(encoding="utf-8")), False)


def main(argv: list[str]) -> int:
    counts = {"imports": 0, "inside": 0}
    own_inside: list[str] = []
    long_fns: list[str] = []
    for top in OWN:
        for p in sorted((ROOT / top).rglob("*.py")):
            scan(p, str(p.relative_to(ROOT)), counts, own_inside, long_fns)
    share = 100 * counts["inside"] / max(counts["imports"], 1)
    print(f"imports: {counts['imports']}, inside functions: {counts['inside']} ({share:.0f} %), "
          f"of the project's own modules: {len(own_inside)}")
    print(f"functions of {LONG}+ lines: {len(long_fns)}")
    for f in long_fns:
        print("  " + f)
    if "-v" in argv:
        print("own imports inside functions:")
        for line in own_inside:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
