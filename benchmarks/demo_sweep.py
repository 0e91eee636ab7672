"""One table row per `fvlm demo` run: what changed, macro AUC, the focal findings' AUCs, CPU seconds.

Each run is a demo output folder (``fvlm demo --out DIR``) and, optionally, the ``/usr/bin/time -v``
report of the command that made it (``DIR.time`` next to the folder, or ``--time FILE``), which
gives the CPU seconds (user + sys, all stages) and the peak RSS. With ``--negation`` the row also
says whether the trained text side separates a finding from its negation: the cosine similarity
of the projected positive and negative prompts (taxonomy wording, e.g. "Lung nodule." vs "No lung
nodule.") in the finding's anatomy space, next to the same cosine on the frozen MiniLM features.

    nice -n 5 /usr/bin/time -v -o runs/c48.time fvlm demo --out runs/c48 --set ...
    python benchmarks/demo_sweep.py runs/c48=crop48 runs/base=baseline --negation

Prints a Markdown table (and ``--json FILE`` writes the rows).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

#: the inserted findings that are small or patchy (the issue-19 targets); the others change a whole organ
FOCAL = ["lung_nodule", "emphysema", "arterial_wall_calcification", "renal_cyst", "nephrolithiasis",
         "liver_mass", "hepatic_cyst", "consolidation"]


def time_report(path: Path) -> dict:
    """CPU seconds (user + sys), wall seconds and peak RSS (MB) from a ``/usr/bin/time -v`` report."""
    text = path.read_text()

    def num(label):
        m = re.search(re.escape(label) + r":\s*([0-9.:]+)", text)
        return m.group(1) if m else None

    wall = num("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    secs = None
    if wall:
        parts = [float(p) for p in wall.split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss = num("Maximum resident set size (kbytes)")
    return {"cpu_s": float(num("User time (seconds)") or 0) + float(num("System time (seconds)") or 0),
            "wall_s": secs, "peak_rss_mb": float(rss) / 1024 if rss else None}


def negation_cosines(ckpt: Path, taxonomy: str, diagnoses: list[str]) -> dict:
    """``{diagnosis: (trained cosine, frozen-MiniLM cosine)}`` of its first positive vs first negative prompt."""
    import torch
    import torch.nn.functional as F

    from fvlm.models.checkpoint import load_consolidated
    from fvlm.taxonomy import load_taxonomy

    net, _ = load_consolidated(ckpt)
    tax = {d.id: d for d in load_taxonomy(taxonomy).diagnoses}
    out = {}
    with torch.no_grad():
        for did in diagnoses:
            d = tax.get(did)
            if d is None or d.anatomy not in net.anatomies:
                continue
            pos, neg = d.prompts_positive[0], d.prompts_negative[0]
            e = net.encode_text([pos, neg], anatomy=d.anatomy)
            raw = F.normalize(net._raw_text([pos, neg]).float(), dim=-1)
            out[did] = (float(e[0] @ e[1]), float(raw[0] @ raw[1]))
    return out


def row(run: Path, change: str, time_file: Path | None, negation: bool, taxonomy: str) -> dict:
    res = json.loads((run / "results" / "fvlm" / "results.json").read_text())
    zs = res["zeroshot"]
    macro = zs["macro"]["overall"]["auc"]
    aucs = {d: e["auc"]["value"] for d, e in zs["diagnoses"].items()}
    r = {"run": str(run), "change": change, "macro_auc": macro["value"], "macro_ci": macro.get("ci"),
         "auc": aucs}
    summary = run / "summary.json"
    if summary.is_file():
        r["timings_s"] = json.loads(summary.read_text()).get("timings_s")
    time_file = time_file or run.with_suffix(".time")
    if time_file.is_file():
        r.update(time_report(time_file))
    if negation:
        r["negation_cos"] = negation_cosines(run / "train" / "fvlm" / "model.pt", taxonomy,
                                             [d for d in FOCAL if d in aucs])
    return r


def markdown(rows: list[dict]) -> str:
    focal = [d for d in FOCAL if any(d in r["auc"] for r in rows)]
    head = ["change", "macro AUC [95% CI]", *focal, "CPU-s", "pretrain wall s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, d=2):
        return "n/a" if v is None else f"{v:.{d}f}"

    for r in rows:
        ci = r.get("macro_ci") or [None, None]
        pre = (r.get("timings_s") or {}).get("pretrain_fvlm")
        cells = [r["change"], f"{f(r['macro_auc'], 3)} [{f(ci[0], 3)}, {f(ci[1], 3)}]",
                 *(f(r["auc"].get(d)) for d in focal), f(r.get("cpu_s"), 0), f(pre, 0), f(r.get("peak_rss_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    neg = [r for r in rows if r.get("negation_cos")]
    if neg:
        lines += ["", "cos(positive prompt, negative prompt) after training (frozen MiniLM in brackets):", ""]
        for r in neg:
            lines.append(f"- {r['change']}: " + ", ".join(f"{d} {a:.2f} ({b:.2f})"
                                                          for d, (a, b) in r["negation_cos"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="DIR or DIR=change (a demo output folder and what it changed)")
    p.add_argument("--negation", action="store_true", help="also the prompt-pair cosines of the trained text side")
    p.add_argument("--taxonomy", default="fvlm54")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    rows = []
    for spec in a.runs:
        path, _, change = spec.partition("=")
        rows.append(row(Path(path), change or Path(path).name, None, a.negation, a.taxonomy))
    print(markdown(rows), end="")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
