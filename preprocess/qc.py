"""Quality control: slice montages with anatomy overlays, and the run summary (JSON + Markdown)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from fvlm.data.shards import CaseRecord

__all__ = ["montage", "write_summary", "qc_sample"]


def qc_sample(case_ids: list[str], n: int) -> set[str]:
    """All cases when there are at most ``n``, else a fixed pseudo-random ``n`` (by id hash)."""
    if len(case_ids) <= n:
        return set(case_ids)
    import hashlib

    return set(sorted(case_ids, key=lambda c: hashlib.sha256(c.encode()).hexdigest())[:n])


def montage(rec: CaseRecord, anatomies: list[str], path: str | Path, window=(-1150, 350), dpi: int = 80) -> Path:
    """PNG: axial / coronal / sagittal slices through the volume (or the first crop) with the
    anatomy label map overlaid. Display convention: axial and coronal with patient right on
    the image left (radiological), superior up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    vol, lab = rec.volume, rec.label_map
    if vol is None:
        present = [a for a in anatomies if rec.present.get(a)]
        if not present:
            raise ValueError("nothing to show")
        vol, lab = rec.crops[present[0]], rec.crop_masks[present[0]]
    lab = lab if lab is not None else np.zeros(vol.shape, np.uint8)
    fg = np.nonzero(lab)
    c = [int(np.median(ix)) for ix in fg] if fg[0].size else [s // 2 for s in vol.shape]
    sp = rec.spacing_mm
    lo, hi = window
    views = [("axial", vol[:, :, c[2]], lab[:, :, c[2]], sp[1] / sp[0]),
             ("coronal", vol[:, c[1], :], lab[:, c[1], :], sp[2] / sp[0]),
             ("sagittal", vol[c[0], :, :], lab[c[0], :, :], sp[2] / sp[1])]
    cmap = ListedColormap(plt.get_cmap("tab20")(np.linspace(0, 1, 20)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, img, lb, aspect) in zip(axes, views):
        # arrays are [R->, A->] etc.; transpose so rows are the second axis, flip so up = A or S
        ax.imshow(np.flipud(img.T), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ov = np.ma.masked_equal(np.flipud(lb.T), 0)
        ax.imshow(ov % 20, cmap=cmap, vmin=0, vmax=19, alpha=0.4, aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    axes[0].invert_xaxis()  # x grows towards patient right: show it on the image left
    axes[1].invert_xaxis()
    present = [a for a in anatomies if rec.present.get(a)]
    fig.suptitle(f"{rec.case_id}  spacing {tuple(round(s, 2) for s in sp)} mm  present: {', '.join(present) or '-'}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def _text_hist(counts, labels, width: int = 40) -> list[str]:
    m = max(counts) if counts and max(counts) > 0 else 1
    return [f"| {lab} | {c} | `{'#' * int(round(width * c / m))}` |" for lab, c in zip(labels, counts)]


def write_summary(out: Path, metas: list[dict], present: list[dict], errors: list[dict], run: dict,
                  anatomies: list[str], hu_edges, suffix: str = "") -> dict:
    """``summary{suffix}.json`` and ``summary{suffix}.md``: outcome counts, anatomy counts,
    spacing and HU histograms over the finished cases."""
    n_ok = len(metas)
    by_stage = Counter(e["stage"] for e in errors)
    anat = {a: int(sum(1 for p in present if p.get(a))) for a in anatomies}
    hu = np.zeros(len(hu_edges) - 1, dtype=np.int64)
    for m in metas:
        if m.get("hu_hist"):
            hu += np.asarray(m["hu_hist"], dtype=np.int64)
    sp = np.asarray([m["source_spacing_mm"] for m in metas], dtype=float) if metas else np.zeros((0, 3))
    sp_edges = [0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 1e9]
    sp_hist = {ax: np.histogram(sp[:, i], bins=sp_edges)[0].tolist() if len(sp) else [0] * (len(sp_edges) - 1)
               for i, ax in enumerate("xyz")}
    hu_actions = Counter((m.get("hu") or {}).get("action", "none") for m in metas)
    summary = {
        "cases_ok": n_ok, "cases_failed": len(errors), "failed_by_stage": dict(sorted(by_stage.items())),
        "this_run": run, "anatomy_present": anat, "hu_actions": dict(sorted(hu_actions.items())),
        "source_spacing_hist": {"edges_mm": sp_edges[:-1] + ["inf"], **sp_hist},
        "hu_hist": {"edges": [int(e) for e in hu_edges], "counts": hu.tolist()},
        "source_axcodes": dict(Counter(m.get("source_axcodes", "?") for m in metas)),
        "mask_source": dict(Counter(m.get("mask_source", "?") for m in metas)),
        "source_copy": dict(Counter(m["source_copy"] for m in metas if m.get("source_copy"))),
    }
    (out / f"summary{suffix}.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    md = [f"# fvlm preprocess summary{suffix}", "",
          f"- cases written: **{n_ok}**, failed: **{len(errors)}**" +
          (f" ({', '.join(f'{k}: {v}' for k, v in sorted(by_stage.items()))})" if errors else ""),
          f"- this run: {', '.join(f'{k} {v}' for k, v in run.items())}",
          f"- HU handling: {', '.join(f'{k} {v}' for k, v in sorted(hu_actions.items()))}",
          f"- source orientation: {', '.join(f'{k} {v}' for k, v in summary['source_axcodes'].items())}",
          f"- anatomy masks: {', '.join(f'{k} {v}' for k, v in sorted(summary['mask_source'].items()))}"]
    if summary["source_copy"]:
        sc = summary["source_copy"]
        md.append(f"- CT-RATE volume copies: fixed (v2) {sc.get('v2', 0)}, original (v1) {sc.get('v1', 0)}")
    md += ["", "## Anatomies present", "", "| anatomy | cases |", "|---|---|"]
    md += [f"| {a} | {c} |" for a, c in anat.items()]
    md += ["", "## Source slice spacing (z)", "", "| mm | cases | |", "|---|---|---|"]
    labels = [f"{sp_edges[i]}-{sp_edges[i + 1] if sp_edges[i + 1] < 1e9 else 'inf'}" for i in range(len(sp_edges) - 1)]
    md += _text_hist(sp_hist["z"], labels)
    md += ["", "## HU histogram (all cases, subsampled voxels)", "", "| HU | voxels | |", "|---|---|---|"]
    md += _text_hist(hu.tolist(), [f"{int(hu_edges[i])}" for i in range(len(hu_edges) - 1)])
    if errors:
        md += ["", "## Failed cases", "", "| case | stage | reason |", "|---|---|---|"]
        md += [f"| {e['case_id']} | {e['stage']} | {e['reason'].replace('|', '/')} |" for e in errors[:200]]
    (out / f"summary{suffix}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return summary
