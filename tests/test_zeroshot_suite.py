"""The zero-shot suite on a synthetic model with planted signal: counting, protocol, thresholds."""
import copy
import json

import numpy as np
import pytest

from fvlm.config import build
from fvlm.errors import FvlmError
from fvlm.eval import synthetic as S
from fvlm.eval.config import ZeroShotConfig
from fvlm.eval.embed import EmbeddingCache
from fvlm.eval.labels import read_label_files
from fvlm.eval.prompts import build_prompt_sets, score
from fvlm.eval.protocol import CaseInfo, resolve
from fvlm.eval.zeroshot import run_suite


def _cfg(**over):
    base = {"bootstrap": {"n": 50, "seed": 0}, "probe": {"enabled": False}, "retrieval": {"enabled": False}}
    for k, v in over.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return build(ZeroShotConfig, base)


@pytest.fixture(scope="module")
def world():
    tax = S.make_taxonomy()
    ds = S.SyntheticDataset(tax, n_patients={"train": 40, "val": 30, "test": 40}, absent_rate=0.05, seed=1)
    return tax, ds


def test_each_case_encoded_exactly_once_and_each_prompt_once(world, tmp_path):
    tax, ds = world
    model = S.SyntheticModel(tax, signal=0.6)
    cfg = _cfg(probe={"enabled": True}, retrieval={"enabled": True})
    cache = EmbeddingCache(tmp_path, "ck" * 8, "da" * 8)
    out = run_suite(model, ds, tax, cfg, S.make_batch, cache=cache)
    n_cases = out.results["compute"]["cases_encoded"]
    assert n_cases == len(ds.case_ids())          # test + val + train, all used
    assert model.image_calls == n_cases            # batch_size 1: one forward per case
    assert set(model.image_calls_per_case.values()) == {1}
    assert set(ds.get_calls.values()) == {1}       # each volume read once
    prompts = [(t, ps.text_anatomy) for ps in build_prompt_sets(tax) for t in ps.positives + ps.negatives]
    assert all(model.texts_encoded[p] == 1 for p in prompts)
    assert out.results["compute"]["prompt_texts"] == len(set(prompts))
    # a second run reads the cache: no image forward at all, same numbers
    model2 = S.SyntheticModel(tax, signal=0.6)
    out2 = run_suite(model2, ds, tax, cfg, S.make_batch, cache=cache)
    assert model2.image_calls == 0 and out2.results["compute"]["rows_from_cache"] == n_cases
    assert out2.results["zeroshot"]["macro"] == out.results["zeroshot"]["macro"]
    json.dumps(out.results, allow_nan=False)       # the document is strict JSON


def test_batched_encoding_still_once_per_case(world):
    tax, ds = world
    model = S.SyntheticModel(tax)
    out = run_suite(model, ds, tax, _cfg(batch_size=4), S.make_batch)
    n = out.results["compute"]["cases_encoded"]
    assert model.image_calls == -(-n // 4) and set(model.image_calls_per_case.values()) == {1}


def test_planted_findings_score_above_chance(world):
    tax, ds = world
    res = run_suite(S.SyntheticModel(tax, signal=0.5), ds, tax, _cfg(probe={"enabled": True}),
                    S.make_batch).results
    zs = res["zeroshot"]
    assert zs["macro"]["overall"]["n_diagnoses"] == len(tax.diagnoses)
    for did, d in zs["diagnoses"].items():
        assert d["auc"]["value"] > 0.7, did
        assert d["auc"]["ci"][0] <= d["auc"]["value"] <= d["auc"]["ci"][1]
        assert d["embedding"] == d["anatomy"]       # scored on its own anatomy
    assert res["linear_probe"]["macro"]["overall"]["auc"]["value"] > 0.7
    # no signal: chance level
    null = run_suite(S.SyntheticModel(tax, signal=0.0), ds, tax, _cfg(), S.make_batch).results
    assert abs(null["zeroshot"]["macro"]["overall"]["auc"]["value"] - 0.5) < 0.12


def test_clip_baseline_uses_global_embedding(world):
    tax, ds = world
    res = run_suite(S.SyntheticModel(tax), ds, tax, _cfg(scoring={"clip_baseline": True}), S.make_batch).results
    assert {d["embedding"] for d in res["zeroshot"]["diagnoses"].values()} == {"global"}
    assert res["scoring"]["embedding"] == "global"


def test_thresholds_depend_only_on_tuning_data(world):
    tax, ds = world
    model = S.SyntheticModel(tax, signal=0.5)
    base = run_suite(model, ds, tax, _cfg(), S.make_batch).results
    thr = {k: v["threshold"] for k, v in base["zeroshot"]["diagnoses"].items()}
    assert all(t is not None for t in thr.values())
    # flip every test label: metrics change, thresholds do not
    flipped = copy.deepcopy(ds)
    for c in flipped.case_ids("test"):
        r = flipped._cases[c]
        r.labels = {k: (1 - v if v >= 0 else v) for k, v in r.labels.items()}
    res = run_suite(model, flipped, tax, _cfg(), S.make_batch).results
    assert {k: v["threshold"] for k, v in res["zeroshot"]["diagnoses"].items()} == thr
    assert res["zeroshot"]["macro"]["overall"]["auc"]["value"] < 0.5
    # change validation labels: thresholds move
    shuffled = copy.deepcopy(ds)
    rng = np.random.default_rng(0)
    for c in shuffled.case_ids("val"):
        r = shuffled._cases[c]
        r.labels = {k: int(rng.integers(0, 2)) for k in r.labels}
    res = run_suite(model, shuffled, tax, _cfg(), S.make_batch).results
    assert {k: v["threshold"] for k, v in res["zeroshot"]["diagnoses"].items()} != thr


def test_no_validation_split_gives_threshold_free_metrics(world):
    tax, _ = world
    ds = S.SyntheticDataset(tax, n_patients={"train": 10, "test": 30}, seed=2)
    res = run_suite(S.SyntheticModel(tax), ds, tax, _cfg(), S.make_batch).results
    assert res["protocol"]["threshold_source"] == "none"
    assert "threshold-free" in res["protocol"]["statement"]
    d = next(iter(res["zeroshot"]["diagnoses"].values()))
    assert d["threshold"] is None and d["sensitivity"]["value"] is None and d["auc"]["value"] is not None
    assert res["zeroshot"]["weighted_f1"]["value"] is None


def test_train_subset_is_patient_disjoint(world):
    tax, ds = world
    infos = [CaseInfo(c, r.patient_id, r.split) for c, r in ds._cases.items()]
    p = resolve(infos, "test", "val", "train", "train_subset", 0.25, seed=3)
    pat = {c.case_id: c.patient_id for c in infos}
    tune_p, train_p, test_p = ({pat[c] for c in p.tune}, {pat[c] for c in p.train}, {pat[c] for c in p.test})
    assert tune_p and train_p and not (tune_p & train_p) and not (tune_p & test_p)
    assert {ds._cases[c].split for c in p.tune} == {"train"}
    assert len(tune_p) == round(0.25 * 40)
    assert resolve(infos, "test", "val", "train", "train_subset", 0.25, seed=3).tune == p.tune
    assert "patient-disjoint" in p.statement


def test_tuning_patients_overlapping_test_are_dropped():
    infos = [CaseInfo("a1", "A", "test"), CaseInfo("a2", "A", "val"), CaseInfo("b1", "B", "val")]
    p = resolve(infos, "test", "val", "train", "split")
    assert p.tune == ["b1"] and p.notes


def test_protocol_errors():
    infos = [CaseInfo("a", "A", "train")]
    with pytest.raises(FvlmError, match="no cases in the test split 'test'.*train"):
        resolve(infos, "test", "val", "train", "split")
    with pytest.raises(FvlmError, match="tuned on the test split"):
        resolve([CaseInfo("a", "A", "valid")], "valid", "val", "train", "split")


def test_rare_diagnosis_is_listed_as_skipped(world):
    tax, ds = world
    ds2 = copy.deepcopy(ds)
    for c in ds2.case_ids("test"):
        ds2._cases[c].labels["heart_finding1"] = 0
    res = run_suite(S.SyntheticModel(tax), ds2, tax, _cfg(), S.make_batch).results
    sk = {s["id"]: s for s in res["zeroshot"]["skipped"]}
    assert "heart_finding1" in sk and sk["heart_finding1"]["positives"] == 0
    assert "too few" in sk["heart_finding1"]["reason"]
    assert "heart_finding1" not in res["zeroshot"]["diagnoses"]
    assert res["zeroshot"]["macro"]["overall"]["n_diagnoses"] == len(tax.diagnoses) - 1


def test_absent_anatomy_is_excluded_and_counted(world):
    tax, ds = world
    res = run_suite(S.SyntheticModel(tax), ds, tax, _cfg(), S.make_batch).results
    absent = sum(not ds._cases[c].present["lung"] for c in ds.case_ids("test"))
    assert absent > 0
    assert res["zeroshot"]["diagnoses"]["lung_finding0"]["support"]["excluded"] == absent
    assert res["zeroshot"]["diagnoses"]["scan_finding0"]["support"]["excluded"] == 0


def test_bootstrap_in_suite_is_seeded(world):
    tax, ds = world
    m = S.SyntheticModel(tax)
    a = run_suite(m, ds, tax, _cfg(), S.make_batch).results["zeroshot"]["macro"]
    b = run_suite(m, ds, tax, _cfg(), S.make_batch).results["zeroshot"]["macro"]
    c = run_suite(m, ds, tax, _cfg(bootstrap={"seed": 5}), S.make_batch).results["zeroshot"]["macro"]
    assert a == b and a != c
    assert a["overall"]["auc"]["value"] == c["overall"]["auc"]["value"]


def test_labels_file_overrides_silver_and_is_declared(world, tmp_path):
    tax, ds = world
    # a CT-RATE-style CSV with VolumeName and label *names* for test cases; one diagnosis missing
    diags = [d for d in tax.diagnoses if d.id != "scan_finding0"]
    lines = ["VolumeName," + ",".join(d.ctrate for d in diags) + ",Unknown column"]
    for c in ds.case_ids("test"):
        lab = ds._cases[c].labels
        lines.append(f"{c}.nii.gz," + ",".join(str(max(lab[d.id], 0)) for d in diags) + ",1")
    p = tmp_path / "labels.csv"
    p.write_text("\n".join(lines) + "\n")
    table = read_label_files([str(p)], tax)
    assert table.ignored_columns == ["Unknown column"]
    res = run_suite(S.SyntheticModel(tax), ds, tax, _cfg(), S.make_batch, label_table=table).results
    gt = res["ground_truth"]
    assert gt["source"] == "labels_file" and gt["per_role"]["test"]["missing"] == 0
    assert gt["per_role"]["threshold_tuning"]["silver"] > 0
    sk = {s["id"]: s["reason"] for s in res["zeroshot"]["skipped"]}
    assert "no column" in sk["scan_finding0"]
    # unlabeled silver entries became labeled negatives through the file
    assert res["zeroshot"]["diagnoses"]["lung_finding0"]["support"]["unlabeled"] == 0


def test_label_file_errors(world, tmp_path):
    tax, _ = world
    p = tmp_path / "a.csv"
    p.write_text("name,Lung finding 0\nx,1\n")
    with pytest.raises(FvlmError, match="needs a case column"):
        read_label_files([str(p)], tax)
    p.write_text("case_id,Lung finding 0\nx,maybe\n")
    with pytest.raises(FvlmError, match="'maybe' is not one of"):
        read_label_files([str(p)], tax)
    p.write_text("case_id,Whatever\nx,1\n")
    with pytest.raises(FvlmError, match="no column"):
        read_label_files([str(p)], tax)
    with pytest.raises(FvlmError, match="not found"):
        read_label_files([str(tmp_path / "missing.csv")], tax)
    j = tmp_path / "b.jsonl"
    j.write_text('{"case_id": "x", "labels": {"lung_finding0": 1, "heart_finding0": null}}\n')
    t = read_label_files([str(j)], tax)
    assert t.labels["x"] == {"lung_finding0": 1, "heart_finding0": -1}


def test_scoring_rules():
    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    img, pos, neg = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(2, 8)))
    s = score(img, pos, neg, "pairwise", 10.0)
    manual = np.mean([[np.exp(10 * img[i] @ p) / (np.exp(10 * img[i] @ p) + np.exp(10 * img[i] @ n))
                       for p in pos for n in neg] for i in range(6)], axis=1)
    np.testing.assert_allclose(s, manual, rtol=1e-10)
    sa = score(img, pos, neg, "softmax_all", 10.0)
    e = np.exp(10 * img @ np.concatenate([pos, neg]).T)
    np.testing.assert_allclose(sa, e[:, :3].sum(1) / e.sum(1), rtol=1e-10)
    sm = score(img, pos[:1], neg[:1], "mean_embedding", 10.0)
    np.testing.assert_allclose(sm, score(img, pos[:1], neg[:1], "pairwise", 10.0), rtol=1e-10)
    with pytest.raises(FvlmError, match="unknown scoring rule"):
        score(img, pos, neg, "max", 1.0)


def test_ctclip_prompt_wording(world):
    tax, ds = world
    sets = {ps.diagnosis: ps for ps in build_prompt_sets(tax, "ctclip")}
    assert sets["lung_finding0"].positives == ["Lung finding 0 is present."]
    assert sets["lung_finding0"].negatives == ["Lung finding 0 is not present."]
    assert sets["scan_finding0"].positives[0].startswith("scan finding")   # no CT-RATE name: unchanged
    res = run_suite(S.SyntheticModel(tax), ds, tax, _cfg(scoring={"prompts": "ctclip"}), S.make_batch).results
    assert "keep the taxonomy's prompts" in res["scoring"]["prompt_note"]
