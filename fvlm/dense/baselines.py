"""Non-learned baselines that a trained dense head must beat.

- ``background``: every voxel background (Dice 0 wherever a class is present).
- ``location_prior``: each in-plane position ``(x, y)`` gets the label most frequent
  there over all training slices (needs cases on one in-plane grid, as the z-split of
  the shipped sample). It knows where organs usually are, nothing about the image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import DenseCase
from .metrics import SegmentationMeter

__all__ = ["location_prior", "baseline_scores"]


def location_prior(train: Sequence[DenseCase], num_classes: int) -> np.ndarray | None:
    """``(X, Y)`` uint8 majority label over training slices, or None if in-plane shapes differ."""
    shapes = {c.label.shape[:2] for c in train if c.label is not None}
    if len(shapes) != 1:
        return None
    counts = np.zeros((*shapes.pop(), num_classes + 1), np.int64)
    for c in train:
        if c.label is None:
            continue
        for k in range(num_classes + 1):
            counts[..., k] += (c.label == k).sum(2)
    return counts.argmax(-1).astype(np.uint8)


def baseline_scores(train: Sequence[DenseCase], evals: Sequence[DenseCase], class_names: Sequence[str]) -> dict:
    """Mean Dice/IoU of the baselines on ``evals``: ``{name: {"dice", "iou"}}``."""
    out = {}
    prior = location_prior(train, len(class_names))
    preds = {"background": lambda c: np.zeros_like(c.label)}
    if prior is not None:
        preds["location_prior"] = lambda c: (np.repeat(prior[..., None], c.label.shape[2], 2)
                                             if c.label.shape[:2] == prior.shape else None)
    for name, fn in preds.items():
        m = SegmentationMeter(list(class_names))
        ok = True
        for c in evals:
            if c.label is None:
                continue
            p = fn(c)
            if p is None:
                ok = False
                break
            m.update(p, c.label, c.case_id)
        if ok and m.case_ids:
            s = m.summary()["mean"]
            out[name] = {"dice": s["dice"], "iou": s["iou"]}
    return out
