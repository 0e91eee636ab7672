"""Per-diagnosis metrics, thresholds from tuning cases, macro averages and bootstrap CIs.

Shared by the zero-shot scores and the linear-probe scores, so both are judged by
the same rules: the same skipped diagnoses, the same tuning cases, the same
patient resamples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import metrics as M

SCALAR_METRICS = ("auc",) + M.THRESHOLD_METRICS


@dataclass
class DiagnosisInfo:
    id: str
    name: str
    anatomy: str
    embedding: str


def _r(x) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _metrics_on(y: np.ndarray, s: np.ndarray, thr: float | None) -> dict[str, float]:
    out = {"auc": M.roc_auc(y, s)}
    if thr is None:
        out.update({k: float("nan") for k in M.THRESHOLD_METRICS})
    else:
        out.update(M.threshold_metrics(y, s, thr))
    return out


def evaluate(diagnoses: Sequence[DiagnosisInfo], test_scores: np.ndarray, test_labels: np.ndarray,
             test_include: np.ndarray, test_patients: Sequence[str], tune_scores: np.ndarray | None,
             tune_labels: np.ndarray | None, tune_include: np.ndarray | None, *, min_positives: int = 5,
             min_negatives: int = 5, threshold_method: str = "youden", target_sensitivity: float = 0.9,
             n_boot: int = 1000, seed: int = 0, level: float = 0.95,
             unavailable: dict[str, str] | None = None) -> dict:
    """Metrics of every diagnosis on the test cases, thresholds tuned on the tuning cases only.

    Args:
        diagnoses: the columns of the score/label matrices.
        test_scores, test_labels, test_include: ``(N, D)`` scores, labels (1/0/-1) and a bool
            mask of rows that count for each diagnosis (e.g. the anatomy is in the scan).
        test_patients: ``(N,)`` patient of each test row (bootstrap unit).
        tune_*: the same for the threshold-tuning cases, or None (threshold-free metrics only).
        unavailable: diagnosis id -> reason it cannot be scored (listed as skipped).
    Returns a JSON-ready dict: ``diagnoses``, ``skipped``, ``macro``, ``weighted_f1``.
    """
    unavailable = dict(unavailable or {})
    n = test_scores.shape[0]
    per: dict[str, dict] = {}
    skipped: list[dict] = []
    evaluated: list[int] = []
    thresholds: dict[int, float | None] = {}
    for j, info in enumerate(diagnoses):
        support = _support(test_labels[:, j], test_include[:, j])
        pos, neg = support["positives"], support["negatives"]
        if info.id in unavailable:
            skipped.append({"id": info.id, "name": info.name, "anatomy": info.anatomy,
                            "reason": unavailable[info.id], **support})
            continue
        if pos < min_positives or neg < min_negatives:
            skipped.append({"id": info.id, "name": info.name, "anatomy": info.anatomy,
                            "reason": f"too few test cases (need >= {min_positives} positives and "
                                      f">= {min_negatives} negatives)", **support})
            continue
        thr, note, tsup = None, "no threshold-tuning cases", None
        if tune_scores is not None and tune_labels is not None:
            thr, note, tsup = _tuned_threshold(tune_scores[:, j], tune_labels[:, j], tune_include[:, j],
                                               threshold_method, target_sensitivity)
        thresholds[j] = thr
        evaluated.append(j)
        per[info.id] = {"name": info.name, "anatomy": info.anatomy, "embedding": info.embedding,
                        "support": support, "threshold": None if thr is None else float(thr), "threshold_note": note,
                        "tuning_support": tsup}

    anatomies = sorted({diagnoses[j].anatomy for j in evaluated})
    stat = _statistic(diagnoses, evaluated, thresholds, anatomies, test_scores, test_labels, test_include)
    if evaluated:
        if n_boot > 0:
            res = M.bootstrap_ci(stat, n, list(test_patients), n_boot=n_boot, seed=seed, level=level)
            res = {k: v.to_json() for k, v in res.items()}
        else:
            res = {k: {"value": _r(v), "ci": [None, None], "n_valid": 0} for k, v in stat(np.arange(n)).items()}
    else:
        res = {}
    for j in evaluated:
        did = diagnoses[j].id
        for k in SCALAR_METRICS:
            per[did][k] = res[f"{did}/{k}"]
    return {"diagnoses": per, "skipped": skipped, "macro": _macro(res, diagnoses, evaluated, anatomies),
            "weighted_f1": res.get("weighted_f1", {"value": None, "ci": [None, None], "n_valid": 0})}


def _support(labels: np.ndarray, include: np.ndarray) -> dict[str, int]:
    """Counts of one diagnosis's test rows: ``(N,)`` labels (1/0/-1) and the bool rows that count."""
    valid = include & (labels >= 0)
    return {"positives": int(np.sum(labels[valid] == 1)), "negatives": int(np.sum(labels[valid] == 0)),
            "unlabeled": int(np.sum(include & (labels < 0))), "excluded": int(np.sum(~include))}


def _tuned_threshold(scores: np.ndarray, labels: np.ndarray, include: np.ndarray, method: str,
                     target_sensitivity: float) -> tuple[float | None, str | None, dict]:
    """One diagnosis's threshold from its ``(N,)`` tuning rows -> ``(threshold, note, tuning support)``."""
    tv = include & (labels >= 0)
    ty, ts = labels[tv], scores[tv]
    tsup = {"positives": int(np.sum(ty == 1)), "negatives": int(np.sum(ty == 0))}
    if tsup["positives"] and tsup["negatives"]:
        return M.select_threshold(ty, ts, method, target_sensitivity), None, tsup
    return None, "tuning cases lack positives or negatives for this diagnosis", tsup


def _statistic(diagnoses, evaluated: list[int], thresholds: dict, anatomies: list[str], test_scores: np.ndarray,
               test_labels: np.ndarray, test_include: np.ndarray):
    """The bootstrap statistic: rows ``idx`` of the test cases -> every metric (per diagnosis,
    macro, per anatomy, weighted F1) as ``{name: value}``."""
    d = test_scores.shape[1]

    def stat(idx: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        preds = np.zeros((idx.size, d), dtype=bool)
        truth = np.full((idx.size, d), -1, dtype=np.int8)
        for j in evaluated:
            lab = test_labels[idx, j]
            ok = test_include[idx, j] & (lab >= 0)
            y, s = lab[ok], test_scores[idx, j][ok]
            if y.size == 0:
                vals = {k: float("nan") for k in SCALAR_METRICS}
            else:
                vals = _metrics_on(y, s, thresholds[j])
            for k, v in vals.items():
                out[f"{diagnoses[j].id}/{k}"] = v
            if thresholds[j] is not None:
                truth[ok, j] = lab[ok]
                preds[:, j] = test_scores[idx, j] >= thresholds[j]
        for k in SCALAR_METRICS:
            vals = [out[f"{diagnoses[j].id}/{k}"] for j in evaluated]
            out[f"macro/{k}"] = _nanmean(vals)
            for a in anatomies:
                out[f"anatomy:{a}/{k}"] = _nanmean([out[f"{diagnoses[j].id}/{k}"] for j in evaluated
                                                    if diagnoses[j].anatomy == a])
        with_thr = [j for j in evaluated if thresholds[j] is not None]
        out["weighted_f1"] = M.weighted_f1(truth[:, with_thr], preds[:, with_thr]) if with_thr else float("nan")
        return out

    return stat


def _macro(res: dict, diagnoses, evaluated: list[int], anatomies: list[str]) -> dict:
    macro = {"overall": {k: res[f"macro/{k}"] for k in SCALAR_METRICS} if evaluated else {},
             "per_anatomy": {a: {k: res[f"anatomy:{a}/{k}"] for k in SCALAR_METRICS} for a in anatomies},
             "n_diagnoses": len(evaluated)}
    if evaluated:
        macro["overall"]["n_diagnoses"] = len(evaluated)
        for a in anatomies:
            macro["per_anatomy"][a]["n_diagnoses"] = sum(1 for j in evaluated if diagnoses[j].anatomy == a)
    return macro


def _nanmean(vals: list[float]) -> float:
    arr = np.asarray(vals, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def roc_points(diagnoses: Sequence[DiagnosisInfo], scores: np.ndarray, labels: np.ndarray,
               include: np.ndarray, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{diagnosis id: (fpr, tpr)}`` on the test cases, for the evaluated diagnoses ``ids``."""
    out = {}
    for j, info in enumerate(diagnoses):
        if info.id not in ids:
            continue
        ok = include[:, j] & (labels[:, j] >= 0)
        fpr, tpr, _ = M.roc_curve(labels[ok, j], scores[ok, j])
        out[info.id] = (fpr, tpr)
    return out
