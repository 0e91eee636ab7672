"""Segmentation and grounding metrics (pure numpy; no torch).

Conventions:

- A prediction/target *label map* holds integer class ids, ``0`` = background.
- Dice ``2|P∩T| / (|P| + |T|)``, IoU ``|P∩T| / |P∪T|``. When a class is absent from both
  prediction and target the score is undefined: ``nan`` here, ``null`` in JSON, and it is
  left out of means (an empty-vs-empty case says nothing about the model).
- The pointing game counts a hit when the heatmap's maximum lies inside the target mask
  (optionally dilated by ``tolerance`` voxels). Its chance level for one case is the
  fraction of candidate voxels (the whole image, or a body mask) covered by the mask.
  :func:`pointing_p_value` tests the hit count against one chance level (one-sided binomial).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["confusion_counts", "dice_iou_from_counts", "per_class_dice_iou", "binary_dice_iou",
           "pointing_game", "pointing_chance", "pointing_p_value", "SegmentationMeter", "nanmean"]


def nanmean(values) -> float:
    """Mean over the finite values; ``nan`` if there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def confusion_counts(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore: np.ndarray | None = None) -> np.ndarray:
    """Per-class ``[tp, fp, fn]`` counts, shape ``(num_classes, 3)``, for class ids ``0..num_classes-1``.

    ``pred`` and ``target`` are integer label maps of the same shape; ``ignore`` is an
    optional boolean mask of voxels to leave out.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        pred, target = pred[keep], target[keep]
    p = pred.reshape(-1).astype(np.int64)
    t = target.reshape(-1).astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes or t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"label ids must lie in [0, {num_classes}), got pred {p.min()}..{p.max()}, "
                         f"target {t.min()}..{t.max()}")
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    return np.stack([tp, fp, fn], axis=1)


def dice_iou_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU from ``(..., 3)`` ``[tp, fp, fn]`` counts; ``nan`` where the class is absent on both sides."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    denom_d = 2 * tp + fp + fn
    denom_i = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom_d > 0, 2 * tp / np.where(denom_d > 0, denom_d, 1), np.nan)
        iou = np.where(denom_i > 0, tp / np.where(denom_i > 0, denom_i, 1), np.nan)
    return dice, iou


def per_class_dice_iou(pred: np.ndarray, target: np.ndarray, num_classes: int,
                       ignore: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU of classes ``1..num_classes-1`` (background excluded), each ``(num_classes - 1,)``."""
    dice, iou = dice_iou_from_counts(confusion_counts(pred, target, num_classes, ignore))
    return dice[1:], iou[1:]


def binary_dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (``nan`` when both are empty)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    tp = float(np.logical_and(p, t).sum())
    fp = float(p.sum()) - tp
    fn = float(t.sum()) - tp
    d, i = dice_iou_from_counts(np.array([tp, fp, fn]))
    return float(d), float(i)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return mask
    from scipy.ndimage import binary_dilation, generate_binary_structure, iterate_structure

    st = iterate_structure(generate_binary_structure(mask.ndim, 1), r)
    return binary_dilation(mask, structure=st)


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance: int = 0,
                  candidates: np.ndarray | None = None) -> bool:
    """True when the heatmap's maximum falls inside ``mask`` (dilated by ``tolerance`` voxels).

    ``candidates``: optional boolean mask restricting where the maximum is searched (e.g.
    the body). Ties go to the first maximum in C order. A case with an empty mask raises,
    since there is nothing to point at.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if h.shape != m.shape:
        raise ValueError(f"heatmap shape {h.shape} differs from mask shape {m.shape}")
    if not m.any():
        raise ValueError("pointing game needs a non-empty target mask")
    if candidates is not None:
        c = np.asarray(candidates, dtype=bool)
        h = np.where(c, h, -np.inf)
    idx = np.unravel_index(int(np.argmax(h)), h.shape)
    return bool(_dilate(m, tolerance)[idx])


def pointing_chance(mask: np.ndarray, tolerance: int = 0, candidates: np.ndarray | None = None) -> float:
    """Hit probability of a uniformly random point (over ``candidates``, default the whole image)."""
    m = _dilate(np.asarray(mask, dtype=bool), tolerance)
    if candidates is None:
        return float(m.mean())
    c = np.asarray(candidates, dtype=bool)
    return float((m & c).sum() / max(1, c.sum()))


def pointing_p_value(hits: int, n: int, chance: float) -> float:
    """One-sided binomial p-value of ``hits`` or more pointing-game hits in ``n`` findings at hit rate ``chance``.

    ``P(X >= hits)`` for ``X ~ Binomial(n, chance)`` (``scipy.stats.binomtest``, alternative
    "greater"). With a chance level that differs per finding, passing their mean is an
    approximation of the exact Poisson-binomial null; it is conservative (never below the
    exact p-value) when ``hits >= n * chance + 1`` (Hoeffding 1956).
    """
    from scipy.stats import binomtest

    return float(binomtest(int(hits), int(n), float(chance), alternative="greater").pvalue)


@dataclass
class SegmentationMeter:
    """Accumulates per-case and global Dice/IoU for a fixed list of class names (ids 1..K)."""

    class_names: list[str]
    counts: np.ndarray = field(init=False)
    case_dice: list[np.ndarray] = field(default_factory=list, init=False)
    case_iou: list[np.ndarray] = field(default_factory=list, init=False)
    case_ids: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        self.counts = np.zeros((len(self.class_names) + 1, 3), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray, case_id: str = "", ignore=None) -> tuple[np.ndarray, np.ndarray]:
        c = confusion_counts(pred, target, len(self.class_names) + 1, ignore)
        self.counts += c
        d, i = dice_iou_from_counts(c)
        self.case_dice.append(d[1:])
        self.case_iou.append(i[1:])
        self.case_ids.append(case_id)
        return d[1:], i[1:]

    def summary(self) -> dict:
        """Per-class means over cases (``dice``/``iou``), global scores from pooled counts, macro means."""
        gd, gi = dice_iou_from_counts(self.counts)
        D = np.stack(self.case_dice) if self.case_dice else np.zeros((0, len(self.class_names)))
        I = np.stack(self.case_iou) if self.case_iou else np.zeros((0, len(self.class_names)))
        per_class = {}
        for k, name in enumerate(self.class_names):
            per_class[name] = {
                "dice": _num(nanmean(D[:, k])), "iou": _num(nanmean(I[:, k])),
                "dice_global": _num(gd[k + 1]), "iou_global": _num(gi[k + 1]),
                "n_cases": int(np.isfinite(D[:, k]).sum()),
                "support_voxels": int(self.counts[k + 1, 0] + self.counts[k + 1, 2]),
            }
        mean = {m: _num(nanmean([v[m] for v in per_class.values()]))
                for m in ("dice", "iou", "dice_global", "iou_global")}
        # a class absent from every target but predicted scores 0 in `mean`; this one asks only
        # how well the classes that are there were found
        there = [v for v in per_class.values() if v["support_voxels"] > 0]
        mean_present = {m: _num(nanmean([v[m] for v in there])) for m in ("dice", "iou")}
        return {"per_class": per_class, "mean": mean, "mean_present": mean_present, "n_cases": len(self.case_ids)}


def _num(x: float):
    """A float for JSON (``None`` for nan), rounded to 6 decimals."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)
