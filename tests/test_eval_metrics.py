"""fvlm.eval.metrics agrees with scikit-learn and its bootstrap resamples patients reproducibly."""
import numpy as np
import pytest
from sklearn import metrics as skm

from fvlm.eval import metrics as M


def _cases():
    rng = np.random.default_rng(0)
    out = []
    for n, ties in [(2, False), (7, False), (50, True), (200, False), (333, True)]:
        for _ in range(4):
            y = rng.integers(0, 2, n)
            y[0], y[-1] = 0, 1
            s = rng.normal(size=n) + 0.8 * y
            if ties:
                s = np.round(s, 1)
            out.append((y, s))
    out.append((np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])))   # all tied
    out.append((np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])))   # perfect
    out.append((np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])))   # inverted
    return out


@pytest.mark.parametrize("y,s", _cases())
def test_auc_and_roc_match_sklearn(y, s):
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = M.roc_curve(y, s)
    sfpr, stpr, sthr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sfpr)
    np.testing.assert_allclose(tpr, stpr)
    np.testing.assert_allclose(thr, sthr)


@pytest.mark.parametrize("y,s", _cases())
def test_threshold_metrics_match_sklearn(y, s):
    for thr in np.quantile(s, [0.1, 0.5, 0.9]):
        pred = (s >= thr).astype(int)
        m = M.threshold_metrics(y, s, thr)
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
        assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        if pred.any():
            assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
        else:
            assert np.isnan(m["precision"])


def test_undefined_metrics_are_nan():
    assert np.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(M.roc_auc([0, 0], [0.1, 0.2]))
    m = M.threshold_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert np.isnan(m["sensitivity"]) and np.isnan(m["precision"]) and m["specificity"] == 1.0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="0 or 1"):
        M.roc_auc([0, -1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="equal length"):
        M.roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        M.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="positive and negative"):
        M.youden_threshold([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="target sensitivity"):
        M.sensitivity_threshold([0, 1], [0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="unknown threshold method"):
        M.select_threshold([0, 1], [0.1, 0.2], "median")


@pytest.mark.parametrize("y,s", _cases()[:-3])
def test_youden_threshold_is_the_argmax_of_j(y, s):
    thr = M.youden_threshold(y, s)
    fpr, tpr, sthr = skm.roc_curve(y, s, drop_intermediate=False)
    best = np.max(tpr - fpr)
    m = M.threshold_metrics(y, s, thr)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(best)
    assert thr in set(s)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_sensitivity_threshold_reaches_target_with_fewest_calls(target):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y
    thr = M.sensitivity_threshold(y, s, target)
    assert M.threshold_metrics(y, s, thr)["sensitivity"] >= target
    higher = s[s > thr]
    if higher.size:  # the next higher distinct score misses the target
        assert M.threshold_metrics(y, s, higher.min())["sensitivity"] < target


def test_weighted_f1_matches_sklearn_and_ignores_unlabeled():
    rng = np.random.default_rng(1)
    yt = rng.integers(0, 2, (100, 6))
    yp = rng.integers(0, 2, (100, 6))
    assert M.weighted_f1(yt, yp) == pytest.approx(skm.f1_score(yt, yp, average="weighted"))
    yt2 = yt.copy()
    yt2[:10, 2] = -1
    keep = np.ones(100, bool)
    keep[:10] = False
    per = [skm.f1_score(yt2[keep if j == 2 else slice(None), j], yp[keep if j == 2 else slice(None), j])
           for j in range(6)]
    sup = [int((yt2[:, j] == 1).sum()) for j in range(6)]
    assert M.weighted_f1(yt2, yp) == pytest.approx(np.dot(per, sup) / sum(sup))


def test_bootstrap_resamples_patients_not_scans():
    # 3 patients with 1, 2 and 5 scans: a resample is a union of whole patients
    pids = ["a", "b", "b", "c", "c", "c", "c", "c"]
    groups = {p: [i for i, q in enumerate(pids) if q == p] for p in set(pids)}
    res = M.bootstrap_indices(pids, 200, seed=7)
    sizes = set()
    for idx in res:
        counts = {p: sum(1 for i in idx if pids[i] == p) for p in groups}
        for p, c in counts.items():
            assert c % len(groups[p]) == 0          # whole patients only
            for i in groups[p]:                      # every scan of a drawn patient, equally often
                assert list(idx).count(i) == c // len(groups[p])
        assert sum(c // len(groups[p]) for p, c in counts.items()) == 3  # 3 patients drawn
        sizes.add(len(idx))
    assert len(sizes) > 1  # sizes vary, which scan-level resampling would not do


def test_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(2)
    n = 120
    pids = np.repeat(np.arange(40), 3)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + y

    def stat(idx):
        return M.roc_auc(y[idx], s[idx])

    a = M.bootstrap_ci(stat, n, pids, n_boot=200, seed=11)
    b = M.bootstrap_ci(stat, n, pids, n_boot=200, seed=11)
    c = M.bootstrap_ci(stat, n, pids, n_boot=200, seed=12)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.low <= a.value <= a.high
    assert a.value == pytest.approx(skm.roc_auc_score(y, s))
    multi = M.bootstrap_ci(lambda idx: {"auc": stat(idx), "n": float(len(idx))}, n, pids,
                           n_boot=200, seed=11)
    assert (multi["auc"].low, multi["auc"].high) == (a.low, a.high)


def test_bootstrap_ci_is_nan_when_statistic_mostly_undefined():
    y = np.array([1, 0, 0, 0, 0, 0])
    s = np.arange(6.0)
    r = M.bootstrap_ci(lambda i: M.roc_auc(y[i], s[i]), 6, list("abcdef"), n_boot=50, seed=0,
                       min_valid=0.9)
    assert np.isnan(r.low) and r.n_valid < 45
    assert r.to_json()["ci"] == [None, None]


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.0],
                    [0.8, 0.5, 0.1],
                    [0.1, 0.2, 0.3]])
    r = M.recall_at_k(sim, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(2 / 3), "R@2": 1.0, "R@3": 1.0}
    # ties count against the query: constant similarities give chance-free zero at R@1
    assert M.recall_at_k(np.ones((4, 4)), ks=(1,))["R@1"] == 0.0
    # a custom positives mask (two equivalent gallery items)
    pos = np.array([[True, True, False], [False, True, False], [False, False, True]])
    assert M.retrieval_ranks(sim, pos).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="square"):
        M.recall_at_k(np.ones((2, 3)))
