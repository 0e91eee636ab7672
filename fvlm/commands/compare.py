"""``fvlm compare A.json B.json ...``: side-by-side metrics of zero-shot results (ablations)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FvlmError

HELP = "print a side-by-side table of two or more zero-shot results.json files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS.json",
                   help="results.json files (or the directories holding them); the first is the reference")
    p.add_argument("--metric", default="auc",
                   choices=["auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "precision", "accuracy"],
                   help="metric to compare (default auc)")
    p.add_argument("--section", default="zeroshot", choices=["zeroshot", "linear_probe"],
                   help="zero-shot scores or the linear-probe baseline")
    p.add_argument("--names", nargs="+", metavar="NAME", help="column names (default: file/directory names)")
    p.add_argument("--ci", action="store_true", help="show 95%% confidence intervals")
    p.add_argument("--out", metavar="FILE.md", help="also write the table to this file")


def _read(path, section: str) -> dict:
    """A results file checked for what the table needs, so a malformed one is a one-line error."""
    from ..eval.report import read_results

    try:
        doc = read_results(path)
    except UnicodeDecodeError as e:
        raise FvlmError(f"{path}: not UTF-8 text (byte {e.start}); is it a results.json?") from None
    sec = doc.get(section)
    if sec is not None and not isinstance(sec, dict):
        raise FvlmError(f"{path}: '{section}' must be an object, got {type(sec).__name__}")
    diags = (sec or {}).get("diagnoses") or {}
    if not isinstance(diags, dict):
        raise FvlmError(f"{path}: '{section}.diagnoses' must be an object, got {type(diags).__name__}")
    for did, d in diags.items():
        if not isinstance(d, dict) or not isinstance(d.get("anatomy"), str):
            raise FvlmError(f"{path}: diagnosis {did!r} in '{section}' has no 'anatomy' (the results file is "
                            "malformed; write it again with `fvlm zeroshot`)")
    return doc


def run(args) -> int:
    from ..eval.report import compare_table

    if len(args.results) < 2:
        raise FvlmError("compare needs at least two results files")
    docs = [_read(r, args.section) for r in args.results]
    if args.names and len(args.names) != len(docs):
        raise FvlmError(f"--names has {len(args.names)} names for {len(docs)} results files")

    def default_name(r):
        p = Path(r)
        return (p.name if p.is_dir() else p.parent.name if p.name == "results.json" else p.stem) or str(p)

    names = args.names or [default_name(r) for r in args.results]
    text = compare_table(docs, names, args.metric, args.section, args.ci)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0
