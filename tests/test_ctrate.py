"""CT-RATE as users have it: a miniature download layout built from the shipped sample CT.

v1 copies (``train/``, ``valid/``) have blank headers, raw values and LPS voxel order, with
spacing and the -1024 intercept only in the metadata CSV; v2 copies (``*_fixed/``) are HU
with a proper header (the CSV still lists the intercept). Label maps named by VolumeName sit
in a ``--masks`` folder or in the dataset's own segmentation tree.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm.anatomy import load_class_map
from fvlm.cli import main
from fvlm.data import ShardDataset

SMALL = ["--config", "preprocess/small", "--set", "reports.labeler=false", "-q"]
LIVER, SPLEEN = 5, 1            # TotalSegmentator ids (same in v1 and v2)
NAMES = {"train": ["train_1_a_1", "train_2_a_1"], "valid": ["valid_1_a_1", "valid_2_a_1"]}


def _blank(arr) -> nib.Nifti1Image:
    img = nib.Nifti1Image(arr, None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    return img


def _lps(a: np.ndarray) -> np.ndarray:
    """RAS voxel order -> LPS voxel order (DICOM order of CT-RATE's v1 volumes)."""
    return np.ascontiguousarray(a[::-1, ::-1])


def _to_v1_ids(seg: np.ndarray) -> np.ndarray:
    v1 = {n: i for i, n in load_class_map("v1").items()}
    lut = np.zeros(256, np.uint8)
    for i, n in load_class_map("v2").items():
        lut[i] = v1.get(n, 0)
    return lut[seg]


def build_ctrate(root: Path, ct_samples: Path, *, v1=True, v2=True, masks="folder", v1_ids=False,
                 header_rescale=False) -> Path:
    """A CT-RATE-shaped ``root/dataset``; returns the masks folder (or the dataset's tree, or None)."""
    ct = nib.load(ct_samples / "example_ct_sm.nii.gz")
    hu = np.asarray(ct.dataobj).astype(np.int16)
    seg = np.asarray(nib.load(ct_samples / "example_seg.nii.gz").dataobj).astype(np.uint8)
    if v1_ids:
        seg = _to_v1_ids(seg)
    ds = root / "dataset"
    mdir = {"folder": root / "masks", "tree": ds / "ts_seg" / "ts_total", None: None}[masks]
    rows_meta, rows_rep, rows_lab = [], [], []
    for split, names in NAMES.items():
        for name in names:
            patient, study = "_".join(name.split("_")[:2]), "_".join(name.split("_")[:3])
            if v1:
                d = ds / split / patient / study
                d.mkdir(parents=True, exist_ok=True)
                if header_rescale:        # raw values with the rescale in the header: the reader applies it
                    img = nib.Nifti1Image(_lps(hu + 1024).astype(np.int16), None)
                    img.header.set_qform(None, code=0)
                    img.header.set_sform(None, code=0)
                    img.header.set_slope_inter(1.0, -1024.0)
                else:
                    img = _blank(_lps(hu + 1024).astype(np.int16))
                nib.save(img, str(d / f"{name}.nii.gz"))
                if mdir is not None:
                    md = mdir / split / patient / study if masks == "tree" else mdir
                    md.mkdir(parents=True, exist_ok=True)
                    nib.save(_blank(_lps(seg)), str(md / f"{name}.nii.gz"))
            if v2:
                d = ds / f"{split}_fixed" / patient / study
                d.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(hu, ct.affine), str(d / f"{name}.nii.gz"))
                if mdir is not None:
                    md = mdir / f"{split}_fixed" / patient / study
                    md.mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(seg, ct.affine), str(md / f"{name}.nii.gz"))
            rows_meta.append([f"{name}.nii.gz", "-1024", "1", "[3.0, 3.0]", "3.0"])
            rows_rep.append([f"{name}.nii.gz", "", "", f"Mild cardiomegaly in {name}. Lymph nodes up to 7 mm.",
                             "Cardiomegaly."])
            rows_lab.append([f"{name}.nii.gz"] + [1 if i in (2, 6) else 0 for i in range(18)])
    for sub, header, rows in (("metadata", ["VolumeName", "RescaleIntercept", "RescaleSlope", "XYSpacing",
                                            "ZSpacing"], rows_meta),
                              ("radiology_text_reports", ["VolumeName", "ClinicalInformation_EN", "Technique_EN",
                                                          "Findings_EN", "Impressions_EN"], rows_rep)):
        (ds / sub).mkdir(parents=True, exist_ok=True)
        with open(ds / sub / f"{sub}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    from fvlm.taxonomy import load_taxonomy
    (ds / "multi_abnormality_labels").mkdir(exist_ok=True)
    with open(ds / "multi_abnormality_labels" / "predicted_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName"] + load_taxonomy("ctrate18").names())
        w.writerows(rows_lab)
    return mdir


def _centroid(lab: np.ndarray, k: int) -> np.ndarray:
    return np.argwhere(lab == k).mean(0)


def check_geometry(ds: ShardDataset, case_id: str) -> dict:
    """Liver on the patient's right, lungs above the liver, air about -1000 HU (RAS arrays)."""
    rec = ds.get(case_id)
    ids = {a: i + 1 for i, a in enumerate(ds.anatomies)}
    liver, spleen = _centroid(rec.label_map, ids["liver"]), _centroid(rec.label_map, ids["spleen"])
    lung = _centroid(rec.label_map, ids["lung"])
    assert liver[0] > spleen[0] + 5, (case_id, "liver must lie on the patient's right (+x in RAS)")
    assert lung[2] > liver[2], (case_id, "lungs above the liver")
    air = np.percentile(rec.volume[rec.label_map == ids["lung"]], 10)
    assert -1100 < air < -800, (case_id, air)
    return rec.meta


def test_v1_blank_header_masks_get_the_image_geometry(ct_samples, tmp_path):
    mdir = build_ctrate(tmp_path, ct_samples, v2=False)
    out = tmp_path / "o"
    assert main(["preprocess", "--input", str(tmp_path / "dataset"), "--masks", str(mdir), "--out", str(out),
                 *SMALL]) == 0
    ds = ShardDataset(out)
    assert sorted(ds.case_ids()) == sorted(NAMES["train"] + NAMES["valid"])
    for cid in ds.case_ids():
        meta = check_geometry(ds, cid)
        assert meta["source_copy"] == "v1" and "assumed LPS" in meta["spacing_source"]
        assert meta["hu"]["action"] == "applied_metadata_rescale" and meta["mask_source"] == "precomputed"
    assert "original (v1) 4" in (out / "summary.md").read_text()


def test_fixed_copies_preferred_and_the_choice_is_a_key(ct_samples, tmp_path):
    build_ctrate(tmp_path, ct_samples, masks="tree")        # both copies, the dataset's own mask tree
    out = tmp_path / "o"
    assert main(["preprocess", "--input", str(tmp_path / "dataset"), "--out", str(out), *SMALL]) == 0
    ds = ShardDataset(out)
    assert len(ds.case_ids()) == 4
    for cid in ds.case_ids():
        meta = check_geometry(ds, cid)
        assert meta["source_copy"] == "v2"
        assert meta["hu"]["action"] == "metadata_rescale_ignored"      # HU already: -1024 not applied again
    assert "fixed (v2) 4, original (v1) 0" in (out / "summary.md").read_text()
    out1 = tmp_path / "o1"
    assert main(["preprocess", "--input", str(tmp_path / "dataset"), "--out", str(out1), *SMALL,
                 "--set", "ctrate.volumes=original"]) == 0
    ds1 = ShardDataset(out1)
    for cid in ds1.case_ids():
        assert check_geometry(ds1, cid)["source_copy"] == "v1"     # the v1 mask of the tree, not the v2 one
    np.testing.assert_array_equal(ds1.get("train_1_a_1").label_map, ds.get("train_1_a_1").label_map)


def test_header_rescale_not_applied_twice(ct_samples, tmp_path):
    mdir = build_ctrate(tmp_path, ct_samples, v2=False, header_rescale=True)
    out = tmp_path / "o"
    assert main(["preprocess", "--input", str(tmp_path / "dataset"), "--masks", str(mdir), "--out", str(out),
                 *SMALL]) == 0
    ds = ShardDataset(out)
    meta = check_geometry(ds, "train_1_a_1")
    assert meta["hu"]["action"] == "metadata_rescale_ignored"


def test_no_masks_is_one_line_before_any_volume_is_read(ct_samples, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts_home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    build_ctrate(tmp_path, ct_samples, masks=None)
    import preprocess.load as load

    def boom(*a, **k):
        raise AssertionError("a volume was read")
    monkeypatch.setattr(load, "load_nifti", boom)
    assert main(["preprocess", "--input", str(tmp_path / "dataset"), "--out", str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--masks DIR" in err[0] and "of the 4 cases" in err[0]


def test_v1_class_map_detected_and_checked(ct_samples, tmp_path, capsys):
    mdir = build_ctrate(tmp_path, ct_samples, v2=False, v1_ids=True)
    args = ["preprocess", "--input", str(tmp_path / "dataset"), "--masks", str(mdir), *SMALL]
    assert main(args + ["--out", str(tmp_path / "o")]) == 2
    assert "masks.class_map=v1" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "o1"), "--set", "masks.class_map=v1"]) == 0
    check_geometry(ShardDataset(tmp_path / "o1"), "valid_2_a_1")


def test_detect_class_map(ct_samples, tmp_path):
    from preprocess.masks import detect_class_map
    seg = nib.load(ct_samples / "example_seg.nii.gz")
    v1 = tmp_path / "v1.nii.gz"
    nib.save(nib.Nifti1Image(_to_v1_ids(np.asarray(seg.dataobj).astype(np.uint8)), seg.affine), str(v1))
    assert detect_class_map(str(ct_samples / "example_seg.nii.gz"), None)[0] == "v2"
    assert detect_class_map(str(v1), None)[0] == "v1"
    md = tmp_path / "dir"
    md.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(md / "heart_myocardium.nii.gz"))
    assert detect_class_map(None, str(md))[0] == "v1"


def test_two_copies_of_one_version_are_an_error(ct_samples, tmp_path, capsys):
    build_ctrate(tmp_path, ct_samples, v2=False, masks=None)
    extra = tmp_path / "dataset" / "valid" / "other"
    extra.mkdir(parents=True)
    (extra / "valid_1_a_1.nii.gz").write_bytes((tmp_path / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz")
                                               .read_bytes())
    assert main(["preprocess", "--input", str(tmp_path / "dataset"), "--out", str(tmp_path / "o"), *SMALL,
                 "--mask-source", "none"]) == 2
    assert "two v1 copies of valid_1_a_1.nii.gz" in capsys.readouterr().err


# --------------------------------------------------------------------------- comparison protocols


def test_ctrate16_is_ctrate18_minus_the_two_global_labels():
    from fvlm.taxonomy import load_taxonomy
    t16, t18 = load_taxonomy("ctrate16"), load_taxonomy("ctrate18")
    assert [d.name for d in t16.diagnoses] == [d.name for d in t18.diagnoses
                                               if d.name not in ("Medical material", "Lymphadenopathy")]
    assert {d.anatomy for d in t16.diagnoses} == {"lung", "heart", "esophagus", "aorta"}
    # everything inherited through ctrate18 from fvlm54, CT-RATE conventions included
    assert t16.diagnosis("Lung opacity").yields_to == t18.diagnosis("Lung opacity").yields_to != ()
    assert t16.diagnosis("Emphysema").prompts_positive == t18.diagnosis("Emphysema").prompts_positive


@pytest.mark.parametrize("preset,taxonomy,name", [("fvlm", "ctrate16", "fvlm-ctrate16"),
                                                  ("ctclip", "ctrate18", "ctclip-ctrate18")])
def test_protocol_presets_are_honest_and_named(preset, taxonomy, name):
    from fvlm.config import load_config
    from fvlm.eval.config import ZeroShotConfig
    from fvlm.eval.report import published_anchors
    from fvlm.resources import config_path
    cfg = load_config(ZeroShotConfig, [str(config_path(f"eval/ctrate_{preset}.yaml"))])
    assert cfg.taxonomy == taxonomy and cfg.protocol == name
    assert cfg.thresholds.source == "train_subset" and cfg.splits.test == "valid"     # never from test
    assert name in published_anchors()


def test_results_md_shows_ours_beside_published():
    from fvlm.eval.report import published_block
    v = lambda x: {"value": x, "ci": [None, None]}  # noqa: E731
    doc = {"protocol": {"name": "fvlm-ctrate16"},
           "zeroshot": {"macro": {"overall": {"auc": v(0.701), "accuracy": v(0.65), "precision": v(0.3)}},
                        "weighted_f1": v(0.6)}}
    text = "\n".join(published_block(doc))
    assert "| AUC (macro) | 70.1 | 77.8 |" in text and "| F1 (support-weighted) | 60.0 | 75.1 |" in text
    assert "ICLR 2025" in text
    assert published_block({"protocol": {"name": "fvlm"}, "zeroshot": doc["zeroshot"]}) == []
