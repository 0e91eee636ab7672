"""Linear probe of a frozen X-ray encoder on labelled radiographs.

Features are the encoder's mean patch token (or class token) of each image; one logistic
regression per label (``fvlm.eval.probe.fit_predict``) is scored out-of-fold (k-fold, or
leave-one-out for small sets) with the AUC of ``fvlm.eval.metrics``.

Labels CSV: a column ``image``/``file``/``path`` (relative to the CSV) plus either an
NIH-style column of ``|``-separated findings (``label_column``, default
``finding_labels``; "No Finding" is no label) or, with ``label_column: columns``, one 0/1
column per label.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FvlmError
from ..eval.metrics import roc_auc
from ..eval.probe import fit_predict
from ..models.xray_mae import load_encoder
from .data import list_images, load_sample

__all__ = ["read_labels", "extract_features", "linear_probe", "write_probe_report", "probe_encoder"]

_SKIP_COLS = {"image", "file", "path", "mask", "rotate", "rotated_90"}


def read_labels(entries, label_column: str = "finding_labels") -> tuple[list[str], np.ndarray]:
    """(label names, (N, L) int array of 0/1) from the ``labels`` of manifest entries."""
    if not entries:
        raise FvlmError("the labels file has no rows")
    if label_column == "columns":
        names = [k for k, v in entries[0].labels.items()
                 if k not in _SKIP_COLS and str(v).strip() in ("0", "1", "0.0", "1.0")]
        if not names:
            raise FvlmError("no 0/1 label columns found in the labels file")
        y = np.array([[int(float(e.labels.get(k, 0) or 0)) for k in names] for e in entries], int)
        return names, y
    if label_column not in entries[0].labels:
        raise FvlmError(f"labels file has no column '{label_column}' (columns: {', '.join(entries[0].labels)}); "
                        "set probe.label_column")
    per = [{s.strip() for s in str(e.labels[label_column]).split("|") if s.strip()} - {"No Finding"}
           for e in entries]
    names = sorted(set().union(*per))
    y = np.array([[int(n in p) for n in names] for p in per], int).reshape(len(entries), len(names))
    return names, y


def extract_features(encoder, spec: dict, entries, data_cfg, pool: str = "mean", batch_size: int = 4
                     ) -> tuple[np.ndarray, list[int]]:
    """(M, E) features for the readable entries and the indices of those entries."""
    import torch

    feats, ok = [], []
    mean, std = float(spec.get("pixel_mean", 0.5)), float(spec.get("pixel_std", 0.25))
    encoder.eval()
    buf: list[np.ndarray] = []
    idx: list[int] = []

    def flush():
        if not buf:
            return
        x = (torch.from_numpy(np.stack(buf))[:, None] - mean) / std
        with torch.no_grad():
            t = encoder.forward_features(x)
        p = encoder.num_prefix_tokens
        f = t[:, 0] if (pool == "cls" and p) else t[:, p:].mean(dim=1)
        feats.append(f.float().numpy())
        ok.extend(idx)
        buf.clear()
        idx.clear()

    for i, e in enumerate(entries):
        try:
            s = load_sample(e, data_cfg.size, data_cfg.orientation, data_cfg.normalize, "none", data_cfg.use_window)
        except (FvlmError, OSError, ValueError) as err:
            import logging

            logging.getLogger("fvlm.xray.probe").warning("skipping bad image %s: %s", e.path, err)
            continue
        buf.append(s["image"])
        idx.append(i)
        if len(buf) == batch_size:
            flush()
    flush()
    if not feats:
        raise FvlmError("no labelled image could be read")
    return np.concatenate(feats), ok


def linear_probe(encoder_path: str | os.PathLike, labels_csv: str | os.PathLike, data_cfg, probe_cfg) -> dict:
    """Out-of-fold AUC per label of a logistic regression on frozen features."""
    entries = list_images(labels_csv)
    names, y_all = read_labels(entries, probe_cfg.label_column)
    enc, spec = load_encoder(encoder_path, img_size=data_cfg.size)
    x, ok = extract_features(enc, spec, entries, data_cfg, probe_cfg.pool)
    y_all = y_all[ok]
    n = len(ok)
    folds = n if probe_cfg.folds <= 0 else min(probe_cfg.folds, n)
    rng = np.random.default_rng(0)
    fold_of = rng.permutation(n) % folds
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    results = {}
    for j, name in enumerate(names):
        y = y_all[:, j]
        pos = int(y.sum())
        if pos < probe_cfg.min_positives or n - pos < probe_cfg.min_positives:
            results[name] = {"positives": pos, "n": n, "auc": None,
                             "skipped": f"needs >= {probe_cfg.min_positives} positives and negatives"}
            continue
        scores = np.full(n, np.nan)
        for f in range(folds):
            te, tr = fold_of == f, fold_of != f
            pred, why = fit_predict(x[tr], y[tr], [x[te]])
            if pred is not None:
                scores[te] = pred[0]
        good = ~np.isnan(scores)
        auc = float(roc_auc(y[good], scores[good])) if good.sum() and 0 < y[good].sum() < good.sum() else None
        results[name] = {"positives": pos, "n": n, "auc": auc, "scored": int(good.sum())}
    return {"encoder": str(encoder_path), "labels_file": str(labels_csv), "images": n, "folds": folds,
            "feature_dim": int(x.shape[1]), "labels": results}


def write_probe_report(res: dict, json_path: str | os.PathLike, md_path: str | os.PathLike) -> None:
    Path(json_path).write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = [f"# Linear probe ({res['images']} images, {res['folds']}-fold, features {res['feature_dim']})", "",
             "| label | positives | AUC |", "|---|---|---|"]
    for k, v in res["labels"].items():
        auc = "-" if v["auc"] is None else f"{v['auc']:.3f}"
        lines.append(f"| {k} | {v['positives']} | {auc} |")
    Path(md_path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def probe_encoder(cfg, encoder_path: str | os.PathLike) -> dict:
    """The linear probe of ``cfg.probe`` on the encoder at ``encoder_path``; writes probe.json and
    probe.md to ``cfg.train.out_dir`` and returns the result."""
    res = linear_probe(encoder_path, cfg.probe.labels, cfg.data, cfg.probe)
    out = Path(cfg.train.out_dir)
    write_probe_report(res, out / "probe.json", out / "probe.md")
    return res
