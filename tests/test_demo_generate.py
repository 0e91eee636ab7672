"""The demo corpus generator: determinism, findings inside their anatomy, reports = ground truth."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm.demo.findings import FINDINGS
from fvlm.demo.generate import generate_corpus, load_preset
from fvlm.demo.templates import ANATOMY_IDS
from fvlm.errors import FvlmError
from fvlm.resources import samples_dir

N = 16
DIFFUSE = {"hepatic_steatosis", "emphysema", "cardiomegaly", "splenomegaly"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_a")
    generate_corpus(out, n_cases=N, seed=3, preset="quick")
    return out


def _read_csv(p: Path) -> list[dict]:
    with open(p, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _gt(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in open(corpus / "ground_truth" / "findings.jsonl", encoding="utf-8")]


def _load(p: Path) -> np.ndarray:
    return np.asarray(nib.load(str(p)).dataobj)


def test_layout_and_manifest(corpus):
    rows = _read_csv(corpus / "manifest.csv")
    assert len(rows) == N
    assert list(rows[0]) == ["case_id", "patient_id", "split", "image", "mask", "findings", "impressions"]
    ts_ids = {int(k) for k in json.loads((samples_dir() / "ct" / "class_map_total_v2.json").read_text())}
    for r in rows[:6]:
        img = nib.load(str(corpus / r["image"]))
        assert not Path(r["image"]).is_absolute()
        assert img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(np.diag(img.affine)[:3], 3.0)
        mask = _load(corpus / r["mask"])
        les = _load(corpus / "lesions" / f"{r['case_id']}.nii.gz")
        assert mask.shape == les.shape == img.shape
        assert set(np.unique(mask)) - {0} <= ts_ids
        assert r["findings"] and r["impressions"]
    # labels are kept out of the manifest and live in ground_truth/
    labels = _read_csv(corpus / "ground_truth" / "labels.csv")
    assert [r["case_id"] for r in labels] == [r["case_id"] for r in rows]
    assert set(labels[0]) >= {"case_id", "patient_id", "split", *FINDINGS}
    assert (corpus / "config.yaml").is_file()


def test_patient_level_splits(corpus):
    rows = _read_csv(corpus / "manifest.csv")
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert len(split_of) < len(rows)  # some patients have a chest and an abdominal study


def test_deterministic_with_seed(corpus, tmp_path):
    generate_corpus(tmp_path / "b", n_cases=N, seed=3, preset="quick")
    for name in ("manifest.csv", "ground_truth/labels.csv", "ground_truth/findings.jsonl"):
        assert (corpus / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for sub in ("images", "masks", "lesions"):
        for p in sorted((corpus / sub).glob("*.nii.gz"))[:4]:
            assert np.array_equal(_load(p), _load(tmp_path / "b" / sub / p.name)), p
    generate_corpus(tmp_path / "c", n_cases=N, seed=4, preset="quick")
    assert (corpus / "manifest.csv").read_bytes() != (tmp_path / "c" / "manifest.csv").read_bytes()


def test_findings_lie_inside_their_anatomy(corpus):
    n_checked = 0
    for case in _gt(corpus):
        mask = _load(corpus / "masks" / f"{case['case_id']}.nii.gz")
        les = _load(corpus / "lesions" / f"{case['case_id']}.nii.gz")
        hu = _load(corpus / "images" / f"{case['case_id']}.nii.gz").astype(np.float32)
        ids = {r["lesion_id"] for r in case["findings"]}
        assert set(np.unique(les)) - {0} <= ids
        for r in case["findings"]:
            anat = np.isin(mask, ANATOMY_IDS[r["anatomy"]])
            lesion = les == r["lesion_id"]
            assert lesion.any(), (case["case_id"], r["finding"])
            assert not (lesion & ~anat).any(), (case["case_id"], r["finding"])
            assert r["anatomy"] == FINDINGS[r["finding"]].anatomy
            assert r["anatomy"] in case["anatomies_in_view"]
            # plausible CT appearance against the rest of the organ (diffuse changes included)
            diffuse = [q["lesion_id"] for q in case["findings"] if q["finding"] in DIFFUSE]
            rest = anat & np.isin(les, [0, *diffuse])
            fatty = "hepatic_steatosis" in {q["finding"] for q in case["findings"]}
            if r["finding"] == "hepatic_cyst" and not fatty:
                assert hu[lesion].mean() < hu[rest].mean() - 10
            if r["finding"] == "renal_cyst":  # water density
                assert -20 < hu[lesion].mean() < 25
            if r["finding"] in ("nephrolithiasis", "gallstones", "arterial_wall_calcification"):
                assert hu[lesion].max() > 150
            if r["finding"] in ("lung_nodule", "consolidation", "pleural_effusion"):
                assert hu[lesion].mean() > hu[rest].mean() + 200
            if r["finding"] == "emphysema":
                assert hu[lesion].mean() < -900
            n_checked += 1
    assert n_checked >= 10


def test_reports_agree_with_ground_truth(corpus):
    rows = {r["case_id"]: r for r in _read_csv(corpus / "manifest.csv")}
    labels = {r["case_id"]: r for r in _read_csv(corpus / "ground_truth" / "labels.csv")}
    for case in _gt(corpus):
        truth = {r["finding"] for r in case["findings"]}
        row = rows[case["case_id"]]
        assert {f for f in FINDINGS if labels[case["case_id"]][f] == "1"} == truth
        asserted = set()
        for s in case["report_statements"]:
            assert s["text"] in row[s["section"]]
            if s["positive"]:
                assert set(s["diagnoses"]) <= truth, s
                asserted |= set(s["diagnoses"]) if s["section"] == "findings" else set()
            elif s["diagnoses"]:
                assert not set(s["diagnoses"]) & truth, s
            elif s["anatomy"] != "global":  # a normal sentence denies its whole anatomy
                assert not any(r["anatomy"] == s["anatomy"] for r in case["findings"]), s
        assert asserted == truth


# A tiny independent reading of the report text: a sentence with the keyword and no
# leading "No" asserts the finding; one starting with "No" denies it.
KEYWORDS = {"lung_nodule": r"nodule", "consolidation": r"consolidation", "emphysema": r"emphysem",
            "aortic_aneurysm": r"aneurysm", "hepatic_steatosis": r"steatosis|fatty",
            "splenomegaly": r"splenomegaly|spleen is enlarged|enlarged spleen",
            "nephrolithiasis": r"renal calcul|renal stone|nephrolithiasis|stone in the|calculi in",
            "gallstones": r"gallstone|cholelithiasis"}


def test_report_text_reads_as_ground_truth(corpus):
    rows = {r["case_id"]: r for r in _read_csv(corpus / "manifest.csv")}
    n_pos = n_neg = 0
    for case in _gt(corpus):
        truth = {r["finding"] for r in case["findings"]}
        for sent in re.split(r"(?<=\.) ", rows[case["case_id"]]["findings"]):
            for dx, pat in KEYWORDS.items():
                if re.search(pat, sent, re.I):
                    if sent.startswith("No "):
                        assert dx not in truth, sent
                        n_neg += 1
                    else:
                        assert dx in truth, sent
                        n_pos += 1
    assert n_pos > 5 and n_neg > 5


def test_presets_and_taxonomy_ids():
    quick, default = load_preset("quick"), load_preset("default")
    assert quick.n_cases < default.n_cases
    assert set(default.findings) == set(FINDINGS)
    ref = Path("/work/shared/taxonomy/fvlm54_reference.yaml")
    try:
        from fvlm.taxonomy import load_taxonomy

        tax = load_taxonomy("fvlm54")
        known = {d.id if hasattr(d, "id") else d["id"]: (d.anatomy if hasattr(d, "anatomy") else d["anatomy"])
                 for d in tax.diagnoses}
    except Exception:
        if not ref.is_file():
            pytest.skip("no fvlm54 taxonomy available")
        import yaml

        known = {d["id"]: d["anatomy"] for d in yaml.safe_load(ref.read_text())["diagnoses"]}
    for fid, f in FINDINGS.items():
        assert known.get(fid) == f.anatomy, fid


def test_bad_inputs(tmp_path):
    cfg = load_preset("quick")
    cfg.findings["unicorn_horn"] = cfg.findings["lung_nodule"]
    with pytest.raises(FvlmError, match="unknown demo finding.*unicorn_horn"):
        generate_corpus(tmp_path, config=cfg)
    with pytest.raises(FvlmError, match="n_cases must be at least 1"):
        generate_corpus(tmp_path, n_cases=0, preset="quick")
    with pytest.raises(FvlmError, match="config file not found"):
        generate_corpus(tmp_path, preset="no_such_preset")
