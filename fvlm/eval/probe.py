"""Linear-probe baseline: logistic regression on frozen embeddings, trained on the train split.

One scikit-learn ``LogisticRegression`` per diagnosis, fitted on the train cases'
embedding of that diagnosis' anatomy (the same embedding the zero-shot score uses),
then applied to the tuning and test cases; its scores go through the same metric
code as the zero-shot scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def fit_predict(train_x: np.ndarray, train_y: np.ndarray, apply_x: Sequence[np.ndarray], C: float = 1.0,
                max_iter: int = 2000, class_weight: str | None = "balanced", seed: int = 0
                ) -> tuple[list[np.ndarray] | None, str | None]:
    """Fit on ``train_x`` ``(N, E)`` / ``train_y`` ``(N,)`` (0/1) and return P(positive) for each of ``apply_x``.

    Returns ``(None, reason)`` when the train labels lack a class.
    """
    from sklearn.linear_model import LogisticRegression

    train_y = np.asarray(train_y).astype(int)
    if train_y.size == 0 or train_y.min() == train_y.max():
        return None, "train split lacks positives or negatives"
    clf = LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight, random_state=seed)
    clf.fit(np.asarray(train_x, np.float64), train_y)
    return [clf.predict_proba(np.asarray(x, np.float64))[:, 1] if len(x) else np.zeros(0) for x in apply_x], None
