"""`fvlm demo --quick` end to end: generate -> preprocess -> pretrain (DeepSpeed, CPU) -> zero-shot.

The acceptance bound: under the null hypothesis (scores unrelated to the labels) the AUC of
n1 positives vs n0 negatives is the Mann-Whitney U / (n1 n0) of a random ranking. For each of the
easiest findings (whole-organ changes) we compute the one-sided permutation p-value of the
observed test AUC from 20,000 random rankings with the same n1, n0, and require p < 0.01 / k
(Bonferroni over the k findings checked) for at least two of them. A model that learned
nothing passes this with probability below 1 %.
"""
import json

import numpy as np
import pytest

from fvlm.cli import main

EASIEST = ["splenomegaly", "cardiomegaly", "hepatic_steatosis", "aortic_aneurysm"]


def null_auc_pvalue(auc: float, n_pos: int, n_neg: int, draws: int = 20000, seed: int = 0) -> float:
    """P(AUC >= auc) for random scores, by permutation of ranks (no ties)."""
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    ranks = np.argsort(rng.random((draws, n)), axis=1)[:, :n_pos] + 1  # ranks of the positives
    u = ranks.sum(axis=1) - n_pos * (n_pos + 1) / 2
    return float(((u / (n_pos * n_neg)) >= auc - 1e-12).mean())


def test_null_pvalue_is_calibrated():
    assert null_auc_pvalue(0.5, 10, 10) == pytest.approx(0.5, abs=0.05)
    assert null_auc_pvalue(1.0, 6, 12) < 1e-3         # 1 / C(18, 6) = 5e-5
    assert null_auc_pvalue(0.0, 6, 12) == 1.0


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, caplog, monkeypatch, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # every stage ran and wrote its outputs
    assert (out / "corpus" / "ground_truth" / "labels.csv").is_file()
    assert (out / "shards" / "index.jsonl").is_file() and any((out / "shards" / "qc").glob("*.png"))
    assert (out / "train" / "fvlm" / "model.pt").is_file()
    res = json.loads((out / "results" / "fvlm" / "results.json").read_text())
    assert res["ground_truth"]["source"] == "labels_file"
    assert res["protocol"]["threshold_source"].startswith("split:")
    assert (out / "summary.md").read_text().count("|") > 20

    # the report labeler recovers the generator's findings from the generated reports
    lab = summary["labeler"]["per_label"]
    f1 = {d: r["f1"] for d, r in lab.items() if r["f1"] is not None}
    assert len(f1) >= 10 and np.mean(list(f1.values())) > 0.9, f1

    # zero-shot: the easiest findings are above chance by a margin that is not luck
    diags = res["zeroshot"]["diagnoses"]
    checked = [d for d in EASIEST if d in diags and diags[d]["auc"]["value"] is not None]
    assert len(checked) >= 3, list(diags)
    alpha = 0.01 / len(checked)
    pvals = {d: null_auc_pvalue(diags[d]["auc"]["value"], diags[d]["support"]["positives"],
                                diags[d]["support"]["negatives"]) for d in checked}
    aucs = {d: diags[d]["auc"]["value"] for d in checked}
    assert sum(p < alpha for p in pvals.values()) >= 2, (aucs, pvals)

    # the README's Python API example runs as written on the checkpoint this demo wrote, and that
    # checkpoint carries the shards' preprocessing settings (no fallback warning)
    import logging
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", (repo / "README.md").read_text(),
                     re.S).group(1)
    code = code.replace("runs/demo/train/fvlm/model.pt", str(out / "train" / "fvlm" / "model.pt"))
    caplog.clear()
    capsys.readouterr()
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.WARNING):
        exec(compile(code, "README.md", "exec"), {})
    assert "no preprocessing settings" not in caplog.text
    printed = capsys.readouterr().out
    assert "liver" in printed and "[" in printed
