"""``fvlm compare A.json B.json ...``: side-by-side metrics of zero-shot results (ablations)."""
from __future__ import annotations

import argparse
from pathlib import Path

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


def run(args) -> int:
    from ..errors import FvlmError
    from ..eval.report import compare_table, read_results

    if len(args.results) < 2:
        raise FvlmError("compare needs at least two results files")
    docs = [read_results(r) for r in args.results]
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
