"""Write and read the suite's outputs: ``results.json``, ``results.md``, ROC curves, summary chart.

``results.json`` is the ``fvlm-zeroshot-results`` document (docs/FORMATS.md,
"Results"); :func:`read_results` checks its format name and version.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FormatError, check_format
from ..resources import config_path
from .zeroshot import RESULTS_FORMAT, RESULTS_VERSION

TABLE_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1", "precision")
SHORT = {"auc": "AUC", "balanced_accuracy": "BAcc", "sensitivity": "Sens", "specificity": "Spec",
         "f1": "F1", "precision": "Prec", "accuracy": "Acc"}


def write_json(path: str | os.PathLike, doc: dict) -> Path:
    """Strict JSON (no NaN), UTF-8, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict:
    """Load a ``results.json`` and check its format name and version."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FormatError(f"{p}: no such results file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return check_format(doc, RESULTS_FORMAT, RESULTS_VERSION, p)


# --------------------------------------------------------------------------- markdown


def fmt(m: dict | None, ci: bool = True) -> str:
    """``0.812 [0.770, 0.851]`` from a ``{"value", "ci"}`` entry; ``-`` when undefined."""
    if not m or m.get("value") is None:
        return "-"
    s = f"{m['value']:.3f}"
    lo, hi = (m.get("ci") or [None, None])
    if ci and lo is not None and hi is not None:
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _metric_block(res: dict, title: str) -> list[str]:
    lines = [f"## {title}", ""]
    macro = res["macro"]
    lines += _table(["scope", "n"] + [SHORT[k] for k in TABLE_METRICS],
                    [["**macro, all**", macro["overall"].get("n_diagnoses", 0)]
                     + [fmt(macro["overall"].get(k)) for k in TABLE_METRICS]]
                    + [[f"macro, {a}", v.get("n_diagnoses", "")] + [fmt(v.get(k)) for k in TABLE_METRICS]
                       for a, v in macro["per_anatomy"].items()])
    lines += ["", f"Weighted F1 (support-weighted over diagnoses with a threshold, as in fVLM): "
                  f"{fmt(res.get('weighted_f1'))}", ""]
    rows = []
    for did, d in sorted(res["diagnoses"].items(), key=lambda kv: (kv[1]["anatomy"], kv[0])):
        sup = d["support"]
        rows.append([did, d["anatomy"], f"{sup['positives']}/{sup['negatives']}"]
                    + [fmt(d.get(k)) for k in TABLE_METRICS]
                    + ["-" if d["threshold"] is None else f"{d['threshold']:.4g}"])
    lines += _table(["diagnosis", "anatomy", "pos/neg"] + [SHORT[k] for k in TABLE_METRICS] + ["threshold"], rows)
    if res["skipped"]:
        lines += ["", "Skipped (not dropped silently):", ""]
        lines += _table(["diagnosis", "anatomy", "pos/neg", "reason"],
                        [[s["id"], s["anatomy"], f"{s['positives']}/{s['negatives']}", s["reason"]]
                         for s in res["skipped"]])
    lines.append("")
    return lines


def published_anchors() -> dict:
    """``configs/eval/published.yaml``: protocol name -> published numbers and their protocol."""
    import yaml

    with open(config_path("eval/published.yaml"), encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get("protocols") or {}


def published_block(doc: dict) -> list[str]:
    """Ours beside the published number when the run's protocol names a published one."""
    name = (doc.get("protocol") or {}).get("name")
    pub = published_anchors().get(name)
    if not pub:
        return []
    res = doc["zeroshot"]
    ours = {"auc": res["macro"]["overall"].get("auc"), "accuracy": res["macro"]["overall"].get("accuracy"),
            "precision": res["macro"]["overall"].get("precision"), "weighted_f1": res.get("weighted_f1")}
    label = {"auc": "AUC (macro)", "accuracy": "ACC (macro)", "precision": "precision (macro)",
             "weighted_f1": "F1 (support-weighted)"}
    rows = []
    for k, v in pub.get("metrics", {}).items():
        m = ours.get(k)
        mine = "-" if not m or m.get("value") is None else f"{100 * m['value']:.1f}"
        rows.append([label.get(k, k), mine, f"{float(v):.1f}"])
    lines = [f"## Published numbers, protocol `{name}`", "",
             f"- {pub.get('paper')}; {pub.get('data')}",
             f"- labels: {pub.get('labels')}; anatomies: {pub.get('anatomies')}",
             f"- thresholds: {pub.get('thresholds')}", f"- caveat: {pub.get('caveat')}", ""]
    lines += _table(["metric (%)", "ours", "published"], rows)
    return lines + [""]


def render_markdown(doc: dict) -> str:
    """The human-readable report of a results document."""
    ck = doc.get("checkpoint") or {}
    data = doc.get("data") or {}
    proto = doc["protocol"]
    lines = [f"# Zero-shot results: {Path(str(ck.get('path', '?'))).name}", "",
             f"- checkpoint: `{ck.get('path')}` (sha256 `{str(ck.get('sha256', ''))[:16]}`)",
             f"- data: `{data.get('path')}` (hash `{str(data.get('hash', ''))[:16]}`)",
             f"- taxonomy: {doc['taxonomy']['name']} ({doc['taxonomy']['n_diagnoses']} diagnoses)",
             f"- ground truth: **{doc['ground_truth']['source']}** - {doc['ground_truth']['description']}",
             f"- protocol `{proto['name']}`: {proto['statement']}",
             f"- thresholds: {proto['threshold_method']}"
             + (f" (target sensitivity {proto['target_sensitivity']})" if proto.get("target_sensitivity") else "")
             + f"; 95% CIs: percentile bootstrap over {proto['bootstrap']['n_test_patients']} test patients, "
               f"{proto['bootstrap']['n']} resamples, seed {proto['bootstrap']['seed']}",
             f"- scoring: rule `{doc['scoring']['rule']}`, logit scale {doc['scoring']['logit_scale']:.4g}, "
             f"prompts `{doc['scoring']['prompts']}`, embedding: {doc['scoring']['embedding']}"]
    if doc["scoring"].get("prompt_note"):
        lines.append(f"- note: {doc['scoring']['prompt_note']}")
    for n in proto.get("notes") or []:
        lines.append(f"- note: {n}")
    lines.append("")
    lines += published_block(doc)
    lines += _metric_block(doc["zeroshot"], "Zero-shot")
    lp = doc.get("linear_probe")
    if lp and lp.get("status") == "ok":
        lines += _metric_block(lp, f"Linear probe (logistic regression on frozen embeddings, "
                                   f"{lp['model']['n_train_cases']} train cases)")
    elif lp:
        lines += ["## Linear probe", "", lp.get("status", ""), ""]
    ret = doc.get("retrieval")
    if ret:
        ks = list(next(iter(ret.values()))["image_to_text"])
        lines += ["## Retrieval (test cases)", ""]
        lines += _table(["text", "n", "distinct"] + [f"I->T {k}" for k in ks] + [f"T->I {k}" for k in ks],
                        [[k, v["n"], v["distinct_texts"]] + [f"{v['image_to_text'][x]:.3f}" for x in ks]
                         + [f"{v['text_to_image'][x]:.3f}" for x in ks] for k, v in ret.items()])
        lines.append("")
    c = doc["compute"]
    lines += ["## Compute", "", f"{c['cases_encoded']} cases, {c['image_forwards']} image forwards "
              f"({c['rows_from_cache']} from cache), {c['prompt_texts']} prompt texts in "
              f"{c['prompt_text_calls']} text calls, {c['seconds']} s.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def plot_roc(doc: dict, roc: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG of ROC curves per anatomy (``roc_<anatomy>.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    diags = doc["zeroshot"]["diagnoses"]
    by_anat: dict[str, list[str]] = {}
    for did, d in diags.items():
        if did in roc:
            by_anat.setdefault(d["anatomy"], []).append(did)
    paths = []
    for anat, ids in sorted(by_anat.items()):
        fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=110)
        for did in ids:
            fpr, tpr = roc[did]
            ax.plot(fpr, tpr, lw=1.4, label=f"{diags[did]['name']} ({diags[did]['auc']['value']:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {anat}", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        p = out_dir / f"roc_{anat}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_summary(doc: dict, path: str | os.PathLike) -> Path:
    """Horizontal bars of per-diagnosis AUC with 95% CIs (zero-shot, and probe when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diags = doc["zeroshot"]["diagnoses"]
    ids = sorted(diags, key=lambda d: (diags[d]["anatomy"], d))
    probe = (doc.get("linear_probe") or {}).get("diagnoses") or {}
    h = max(2.5, 0.28 * len(ids) + 1.2)
    fig, ax = plt.subplots(figsize=(7, h), dpi=110)
    y = np.arange(len(ids))

    def bars(src, offset, label, color):
        vals = np.array([(src.get(d) or {}).get("auc", {}).get("value") or np.nan for d in ids], float)
        lo = np.array([((src.get(d) or {}).get("auc", {}).get("ci") or [None, None])[0] or np.nan for d in ids], float)
        hi = np.array([((src.get(d) or {}).get("auc", {}).get("ci") or [None, None])[1] or np.nan for d in ids], float)
        err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)])
        ax.barh(y + offset, vals, height=0.38 if probe else 0.7, color=color, label=label,
                xerr=err, error_kw={"lw": 0.7})

    bars(diags, -0.2 if probe else 0.0, "zero-shot", "#3b75af")
    if probe:
        bars(probe, 0.2, "linear probe", "#ef8636")
    ax.axvline(0.5, c="0.5", ls="--", lw=0.8)
    ax.set_yticks(y, [f"{diags[d]['name']} ({diags[d]['anatomy']})" for d in ids], fontsize=7)
    ax.invert_yaxis()
    macro = doc["zeroshot"]["macro"]["overall"].get("auc") or {}
    ax.set(xlim=(0, 1), xlabel="AUC (95% CI)",
           title=f"macro AUC {fmt(macro)}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 * 8 / h), ncol=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(doc: dict, roc: dict, out_dir: str | os.PathLike, figures: bool = True) -> dict[str, Path]:
    """Write results.json, results.md and (optionally) the figures into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"json": write_json(out_dir / "results.json", doc)}
    md = out_dir / "results.md"
    md.write_text(render_markdown(doc), encoding="utf-8")
    paths["md"] = md
    if figures and doc["zeroshot"]["diagnoses"]:
        for p in plot_roc(doc, roc, out_dir / "figures"):
            paths[p.stem] = p
        paths["summary"] = plot_summary(doc, out_dir / "figures" / "summary.png")
    return paths


# --------------------------------------------------------------------------- compare


def compare_table(docs: Sequence[dict], names: Sequence[str], metric: str = "auc", section: str = "zeroshot",
                  ci: bool = False) -> str:
    """Side-by-side Markdown table of ``metric`` per diagnosis and macro, with deltas to the first."""
    def get(doc, did):
        sec = doc.get(section) or {}
        if did == "__macro__":
            return (sec.get("macro") or {}).get("overall", {}).get(metric)
        if did.startswith("__anat__:"):
            return (sec.get("macro") or {}).get("per_anatomy", {}).get(did[9:], {}).get(metric)
        return ((sec.get("diagnoses") or {}).get(did) or {}).get(metric)

    ids: list[str] = []
    anats: list[str] = []
    anat_of: dict[str, str] = {}
    for doc in docs:
        for did, d in ((doc.get(section) or {}).get("diagnoses") or {}).items():
            if did not in ids:
                ids.append(did)
                anat_of[did] = d["anatomy"]
        for a in ((doc.get(section) or {}).get("macro") or {}).get("per_anatomy", {}):
            if a not in anats:
                anats.append(a)
    ids.sort(key=lambda d: (anat_of[d], d))
    rows_keys = ["__macro__"] + [f"__anat__:{a}" for a in sorted(anats)] + ids
    header = ["", *names] + [f"Δ {n}" for n in names[1:]]
    rows = []
    for key in rows_keys:
        label = ("**macro**" if key == "__macro__" else f"macro {key[9:]}" if key.startswith("__anat__")
                 else f"{key} ({anat_of[key]})")
        vals = [get(doc, key) for doc in docs]
        cells = [fmt(v, ci) for v in vals]
        base = (vals[0] or {}).get("value")
        deltas = []
        for v in vals[1:]:
            x = (v or {}).get("value")
            deltas.append("-" if x is None or base is None else f"{x - base:+.3f}")
        rows.append([label, *cells, *deltas])
    title = [f"{SHORT.get(metric, metric)} ({section})", ""]
    notes = []
    protos = {json.dumps((d.get("protocol") or {}).get("statement")) for d in docs}
    if len(protos) > 1:
        notes.append("warning: the results use different protocols; compare with care")
    gts = {(d.get("ground_truth") or {}).get("source") for d in docs}
    if len(gts) > 1:
        notes.append(f"warning: different ground-truth sources: {', '.join(sorted(map(str, gts)))}")
    datas = {(d.get("data") or {}).get("hash") for d in docs}
    if len(datas) > 1:
        notes.append("warning: the results were computed on different data (data hashes differ)")
    return "\n".join(title + _table(header, rows) + ([""] + notes if notes else [])) + "\n"
