"""Classification and retrieval metrics for the zero-shot suite (pure numpy).

Conventions, shared by every function here:

- ``y`` is a 1-D array of binary labels (1 positive, 0 negative); unlabeled
  entries are removed by the caller, never passed in as -1.
- ``s`` is a 1-D array of real scores, higher meaning "more likely positive".
- A case is called positive when ``s >= threshold`` (the rule of
  ``sklearn.metrics.roc_curve``), so a threshold equal to a score counts that
  score as positive.
- A metric that is undefined on its input (AUC with one class, precision with no
  predicted positives, ...) is ``nan``; callers report it as ``null``.

Bootstrap confidence intervals resample *patients* with replacement (all scans of
a drawn patient come along, as many times as the patient is drawn), because scans
of one patient are correlated and resampling scans would make intervals too narrow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "roc_auc", "roc_curve", "confusion_counts", "threshold_metrics", "youden_threshold",
    "sensitivity_threshold", "select_threshold", "weighted_f1", "patient_groups",
    "bootstrap_indices", "bootstrap_ci", "BootstrapResult", "recall_at_k", "retrieval_ranks",
    "THRESHOLD_METRICS",
]

#: names returned by :func:`threshold_metrics`, in report order
THRESHOLD_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "f1", "precision", "accuracy")


def _check(y, s) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (drop unlabeled cases before scoring)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), s


def _rank_average(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s``, ties sharing their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y, s) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); ties count one half.

    Equals ``sklearn.metrics.roc_auc_score``; ``nan`` when only one class is present.
    """
    y, s = _check(y, s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points at every distinct score, highest threshold first.

    Returns ``(fpr, tpr, thresholds)``; the first point is ``(0, 0)`` at threshold
    ``+inf`` (as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).
    """
    y, s = _check(y, s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(thresholds.size, np.nan)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(thresholds.size, np.nan)
    return fpr, tpr, thresholds


def confusion_counts(y, s, threshold: float) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` when cases with ``s >= threshold`` are called positive."""
    y, s = _check(y, s)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    return tp, fp, tn, fn


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def threshold_metrics(y, s, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1, balanced accuracy and accuracy at a threshold.

    F1 is ``2 tp / (2 tp + fp + fn)`` (``nan`` only when there are no positives and no
    positive calls); balanced accuracy is the mean of sensitivity and specificity.
    """
    tp, fp, tn, fn = confusion_counts(y, s, threshold)
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    return {
        "balanced_accuracy": float((sens + spec) / 2.0),
        "sensitivity": sens,
        "specificity": spec,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "precision": _div(tp, tp + fp),
        "accuracy": _div(tp + tn, tp + fp + tn + fn),
    }


def youden_threshold(y, s) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidates are the distinct scores (``s >= t`` is positive). Among equal J the
    highest threshold wins (fewest positive calls), so the choice is deterministic.
    Raises ``ValueError`` if ``y`` lacks a class.
    """
    y_, s_ = _check(y, s)
    if y_.all() or not y_.any():
        raise ValueError("Youden's J needs positive and negative cases")
    fpr, tpr, thr = roc_curve(y_, s_)
    j = tpr[1:] - fpr[1:]
    return float(thr[1:][int(np.argmax(j))])  # argmax: first = highest threshold


def sensitivity_threshold(y, s, target: float) -> float:
    """The highest threshold whose sensitivity is at least ``target`` (0 < target <= 1)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y_, s_ = _check(y, s)
    if not y_.any():
        raise ValueError("a target-sensitivity threshold needs positive cases")
    _, tpr, thr = roc_curve(y_, s_)
    ok = np.flatnonzero(tpr[1:] >= target - 1e-12)
    return float(thr[1:][ok[0]])


def select_threshold(y, s, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """Pick an operating threshold on *validation* labels/scores by ``method``."""
    if method == "youden":
        return youden_threshold(y, s)
    if method == "sensitivity":
        return sensitivity_threshold(y, s, target_sensitivity)
    raise ValueError(f"unknown threshold method {method!r} (youden, sensitivity)")


def weighted_f1(y_true, y_pred) -> float:
    """Support-weighted mean of per-label F1 over a multi-label problem.

    ``y_true``, ``y_pred``: ``(N, L)`` binary arrays; entries of ``y_true`` equal to -1
    are unlabeled and ignored for that label. The weight of a label is its number of
    positives (``sklearn.metrics.f1_score(..., average="weighted")`` on complete labels),
    the aggregate the fVLM paper reports.
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred).astype(bool)
    if yt.shape != yp.shape or yt.ndim != 2:
        raise ValueError(f"y_true and y_pred must both be (N, L), got {yt.shape} and {yp.shape}")
    num = 0.0
    den = 0
    for j in range(yt.shape[1]):
        m = yt[:, j] >= 0
        t = yt[m, j] == 1
        p = yp[m, j]
        support = int(t.sum())
        if support == 0:
            continue
        tp = int(np.sum(t & p))
        fp = int(np.sum(~t & p))
        fn = int(np.sum(t & ~p))
        num += support * (2 * tp / (2 * tp + fp + fn))
        den += support
    return float(num / den) if den else float("nan")


# --------------------------------------------------------------------------- bootstrap


def patient_groups(patient_ids: Sequence) -> list[np.ndarray]:
    """Indices of each patient's scans, patients in order of first appearance."""
    first: dict = {}
    for i, p in enumerate(patient_ids):
        first.setdefault(p, []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in first.values()]


def bootstrap_indices(patient_ids: Sequence, n_boot: int, seed: int) -> list[np.ndarray]:
    """``n_boot`` resamples of scan indices, drawing *patients* with replacement.

    Each resample has as many patients as the input (so a patient with 3 scans drawn
    twice contributes 6 rows). Deterministic for a given ``seed`` and patient order.
    """
    groups = patient_groups(patient_ids)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(n_boot)):
        pick = rng.integers(0, len(groups), size=len(groups))
        out.append(np.concatenate([groups[k] for k in pick]) if len(groups) else np.array([], np.int64))
    return out


@dataclass
class BootstrapResult:
    """Percentile bootstrap interval of one statistic."""
    value: float               # the statistic on the full data
    low: float                 # lower bound of the interval (nan if too few valid resamples)
    high: float
    n_valid: int               # resamples on which the statistic was defined
    n_boot: int

    def to_json(self) -> dict:
        def f(x):
            return None if x is None or not np.isfinite(x) else round(float(x), 6)
        return {"value": f(self.value), "ci": [f(self.low), f(self.high)], "n_valid": self.n_valid}


def bootstrap_ci(statistic: Callable[[np.ndarray], float | Mapping[str, float]], n_rows: int,
                 patient_ids: Sequence, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 min_valid: float = 0.5, resamples: list[np.ndarray] | None = None):
    """Patient-level percentile bootstrap of ``statistic(indices)``.

    Args:
        statistic: maps an index array (rows of the evaluated data) to a float, or to a
            mapping name -> float to bootstrap several statistics on the same resamples.
        n_rows: number of rows; ``statistic(np.arange(n_rows))`` is the point estimate.
        patient_ids: patient of each row (length ``n_rows``).
        n_boot, seed: number of resamples and the RNG seed (same seed, same intervals).
        level: coverage of the two-sided interval.
        min_valid: if fewer than this fraction of resamples give a finite value (e.g.
            a resample without positives), the interval is ``nan``.
        resamples: precomputed :func:`bootstrap_indices` (overrides n_boot/seed).

    Returns a :class:`BootstrapResult`, or a dict of them for a mapping statistic.
    """
    if len(patient_ids) != n_rows:
        raise ValueError(f"patient_ids has {len(patient_ids)} entries for {n_rows} rows")
    if resamples is None:
        resamples = bootstrap_indices(patient_ids, n_boot, seed)
    point = statistic(np.arange(n_rows))
    single = not isinstance(point, Mapping)
    point_map = {"_": point} if single else dict(point)
    draws: dict[str, list[float]] = {k: [] for k in point_map}
    for idx in resamples:
        v = statistic(idx)
        v = {"_": v} if single else v
        for k in draws:
            draws[k].append(float(v[k]))
    alpha = (1.0 - level) / 2.0
    out = {}
    for k, pv in point_map.items():
        arr = np.asarray(draws[k], dtype=np.float64)
        fin = arr[np.isfinite(arr)]
        if len(resamples) and fin.size >= max(1, min_valid * len(resamples)):
            lo, hi = np.quantile(fin, [alpha, 1.0 - alpha])
        else:
            lo = hi = float("nan")
        out[k] = BootstrapResult(float(pv), float(lo), float(hi), int(fin.size), len(resamples))
    return out["_"] if single else out


# --------------------------------------------------------------------------- retrieval


def retrieval_ranks(sim, positives=None) -> np.ndarray:
    """0-based rank of the first correct gallery item for each query.

    ``sim``: ``(Q, G)`` similarities, queries x gallery. ``positives``: ``(Q, G)`` bool of
    correct items; default the diagonal (query i matches gallery item i). Ties are
    broken *against* the query (every equally scored wrong item ranks first), so a
    constant similarity earns no credit.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarities must be (Q, G), got {sim.shape}")
    if positives is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError("without a positives mask the similarity matrix must be square")
        positives = np.eye(sim.shape[0], dtype=bool)
    positives = np.asarray(positives, dtype=bool)
    if positives.shape != sim.shape:
        raise ValueError("positives must have the shape of the similarity matrix")
    if not positives.any(axis=1).all():
        raise ValueError("every query needs at least one correct gallery item")
    best_pos = np.where(positives, sim, -np.inf).max(axis=1, keepdims=True)
    wrong_ahead = (~positives) & (sim >= best_pos)
    return wrong_ahead.sum(axis=1)


def recall_at_k(sim, ks: Sequence[int] = (1, 5, 10), positives=None) -> dict[str, float]:
    """Recall@k: fraction of queries with a correct item among the top ``k`` (see :func:`retrieval_ranks`)."""
    ranks = retrieval_ranks(sim, positives)
    return {f"R@{k}": float(np.mean(ranks < k)) if ranks.size else float("nan") for k in ks}
