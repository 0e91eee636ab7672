"""One table row per `fvlm demo` run: what changed, macro AUC, the focal findings' AUCs, CPU seconds.

Each run is a demo output folder (``fvlm demo --out DIR``) and, optionally, the ``/usr/bin/time -v``
report of the command that made it (``DIR.time`` next to the folder, or ``--time FILE``), which
gives the CPU seconds (user + sys, all stages) and the peak RSS. With ``--negation`` the row also
says whether the trained text side separates a finding from its negation: the cosine similarity
of the projected positive and negative prompts (taxonomy wording, e.g. "Lung nodule." vs "No lung
nodule.") in the finding's anatomy space, next to the same cosine on the frozen MiniLM features.

    nice -n 5 /usr/bin/time -v -o runs/c48.time fvlm demo --out runs/c48 --set ...
    python benchmarks/demo_sweep.py runs/c48=crop48 runs/base=baseline --negation

With ``--eval`` the row reads the run's larger evaluation split (``fvlm demo --eval-cases N``,
``results_eval/``) instead of its own test split; every AUC cell carries its 95% bootstrap CI.
Without a time report, CPU seconds come from the demo's own ``summary.json`` (``cpu_s.total``).
With ``--prompt-spread`` the row also gives, per anatomy, the mean pairwise cosine of the
taxonomy's prompts of that anatomy (positive and negative wording of all its diagnoses) in the
anatomy's text space: on the frozen MiniLM, in the untrained model (seeded as training was) and
after training; a value near 1 means the prompts collapsed (CA-GCL).

With ``--seeds`` the runs that share a change label (e.g. one configuration trained with
``train.seed`` 0, 1, 2 on the same corpus and evaluation split) are also summarized: per label,
the mean and the min-max over its runs of the macro AUC and of each focal AUC.

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


def _mean_offdiag_cos(e):
    import torch.nn.functional as F

    e = F.normalize(e.float(), dim=-1)
    n = e.shape[0]
    c = e @ e.t()
    return float((c.sum() - c.diagonal().sum()) / (n * (n - 1))) if n > 1 else float("nan")


def prompt_spread(ckpt: Path, taxonomy: str) -> dict:
    """``{anatomy: {"frozen": c, "init": c, "trained": c, "n": prompts}}``: the mean pairwise cosine
    of the taxonomy's prompts of each anatomy the model knows (frozen MiniLM features; the model
    built from the checkpoint's config under its training seed, before any step; the trained one)."""
    import torch

    from fvlm.models import create_model
    from fvlm.models.checkpoint import load_consolidated
    from fvlm.taxonomy import load_taxonomy

    import yaml

    net, meta = load_consolidated(ckpt)
    conf = ckpt.parent / "config.yaml"      # the pretrain run's resolved config: its seed
    seed = ((yaml.safe_load(conf.read_text()) or {}).get("train") or {}).get("seed", 0) if conf.is_file() else 0
    torch.manual_seed(int(seed))            # as fvlm.ct.pretrain.prepare() seeds the model it builds
    init = create_model(meta.get("model_name", "fvlm"), net.cfg).eval()
    out = {}
    with torch.no_grad():
        for a in net.anatomies:
            texts = list(dict.fromkeys(p for d in load_taxonomy(taxonomy).diagnoses if d.anatomy == a
                                       for p in (*d.prompts_positive, *d.prompts_negative)))
            if len(texts) < 2:
                continue
            out[a] = {"frozen": _mean_offdiag_cos(net._raw_text(texts)),
                      "init": _mean_offdiag_cos(init.encode_text(texts, anatomy=a)),
                      "trained": _mean_offdiag_cos(net.encode_text(texts, anatomy=a)), "n": len(texts)}
    return out


def row(run: Path, change: str, time_file: Path | None, negation: bool, taxonomy: str, split: str = "test",
        spread: bool = False) -> dict:
    folder = "results_eval" if split == "eval" else "results"
    res = json.loads((run / folder / "fvlm" / "results.json").read_text())
    zs = res["zeroshot"]
    macro = zs["macro"]["overall"]["auc"]
    aucs = {d: e["auc"]["value"] for d, e in zs["diagnoses"].items()}
    r = {"run": str(run), "change": change, "split": split, "macro_auc": macro["value"], "macro_ci": macro.get("ci"),
         "auc": aucs, "auc_ci": {d: e["auc"].get("ci") for d, e in zs["diagnoses"].items()},
         "positives": {d: (e.get("support") or {}).get("positives") for d, e in zs["diagnoses"].items()}}
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        r["timings_s"] = s.get("timings_s")
        if (s.get("cpu_s") or {}).get("total") is not None:
            r["cpu_s"] = s["cpu_s"]["total"]
    time_file = time_file or run.with_suffix(".time")
    if time_file.is_file():
        r.update(time_report(time_file))
    if negation:
        r["negation_cos"] = negation_cosines(run / "train" / "fvlm" / "model.pt", taxonomy,
                                             [d for d in FOCAL if d in aucs])
    if spread:
        r["prompt_spread"] = prompt_spread(run / "train" / "fvlm" / "model.pt", taxonomy)
    return r


def markdown(rows: list[dict]) -> str:
    focal = [d for d in FOCAL if any(d in r["auc"] for r in rows)]
    head = ["change", "macro AUC [95% CI]", *focal, "CPU-s", "pretrain wall s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, d=2):
        return "n/a" if v is None else f"{v:.{d}f}"

    def auc(r, d):
        v, ci = r["auc"].get(d), (r.get("auc_ci") or {}).get(d)
        return f(v) if v is None or not ci or None in ci else f"{f(v)} [{f(ci[0])}, {f(ci[1])}]"

    for r in rows:
        ci = r.get("macro_ci") or [None, None]
        pre = (r.get("timings_s") or {}).get("pretrain_fvlm")
        cells = [r["change"], f"{f(r['macro_auc'], 3)} [{f(ci[0], 3)}, {f(ci[1], 3)}]",
                 *(auc(r, d) for d in focal), f(r.get("cpu_s"), 0), f(pre, 0), f(r.get("peak_rss_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    neg = [r for r in rows if r.get("negation_cos")]
    if neg:
        lines += ["", "cos(positive prompt, negative prompt) after training (frozen MiniLM in brackets):", ""]
        for r in neg:
            lines.append(f"- {r['change']}: " + ", ".join(f"{d} {a:.2f} ({b:.2f})"
                                                          for d, (a, b) in r["negation_cos"].items()))
    spread = [r for r in rows if r.get("prompt_spread")]
    if spread:
        lines += ["", "mean pairwise cosine of each anatomy's prompts: frozen MiniLM / untrained model / trained:", ""]
        for r in spread:
            lines.append(f"- {r['change']}: " + ", ".join(f"{a} ({v['n']}) {v['frozen']:.2f} / {v['init']:.2f} / "
                                                          f"{v['trained']:.2f}" for a, v in r["prompt_spread"].items()))
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[dict]) -> str:
    """Mean [min, max] over the runs of each change label: macro AUC and each focal AUC."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["change"], []).append(r)
    focal = [d for d in FOCAL if any(d in r["auc"] for r in rows)]
    head = ["configuration", "runs", "macro AUC mean [min, max]", *focal]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(vals, d=2):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{sum(vals) / len(vals):.{d}f} [{min(vals):.{d}f}, {max(vals):.{d}f}]"

    for label, rs in groups.items():
        lines.append("| " + " | ".join([label, str(len(rs)), cell([r["macro_auc"] for r in rs], 3),
                                         *(cell([r["auc"].get(d) for r in rs]) for d in focal)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="DIR or DIR=change (a demo output folder and what it changed)")
    p.add_argument("--negation", action="store_true", help="also the prompt-pair cosines of the trained text side")
    p.add_argument("--taxonomy", default="fvlm54")
    p.add_argument("--eval", action="store_true", help="read the evaluation split (results_eval/), not the test split")
    p.add_argument("--prompt-spread", action="store_true", help="also the per-anatomy prompt spread (lever 4)")
    p.add_argument("--seeds", action="store_true",
                   help="also mean [min, max] over the runs that share a change label (e.g. training seeds)")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    rows = []
    for spec in a.runs:
        path, _, change = spec.partition("=")
        rows.append(row(Path(path), change or Path(path).name, None, a.negation, a.taxonomy,
                        "eval" if a.eval else "test", a.prompt_spread))
    print(markdown(rows), end="")
    if a.seeds:
        print("\n" + seed_summary(rows), end="")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
