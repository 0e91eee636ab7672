"""`fvlm preprocess` end to end on the real TotalSegmentator samples and generated corpora."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from fvlm.cli import main
from fvlm.data import ShardDataset

SMALL = ["--config", "preprocess/small", "--set", "reports.labeler=false", "-q"]


def _nii(path, arr, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


def _manifest(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def reoriented(ct_samples, tmp_path_factory):
    """example_ct_sm + its segmentation stored RAS, LPS and as a permuted-axes PIR copy."""
    d = tmp_path_factory.mktemp("reoriented")
    img = nib.load(ct_samples / "example_ct_sm.nii.gz")
    seg = nib.load(ct_samples / "example_seg.nii.gz")
    a, s, aff = np.asarray(img.dataobj), np.asarray(seg.dataobj), img.affine
    out = {"ras": (str(ct_samples / "example_ct_sm.nii.gz"), str(ct_samples / "example_seg.nii.gz"))}
    # LPS: flip x and y; voxel i -> n-1-i, so the affine gets a negated column and a shifted origin
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = a.shape[0] - 1, a.shape[1] - 1
    out["lps"] = (_nii(d / "lps.nii.gz", a[::-1, ::-1].copy(), aff @ flip),
                  _nii(d / "lps_seg.nii.gz", s[::-1, ::-1].copy(), aff @ flip))
    # PIR: array axes (y reversed, z reversed, x)
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    perm[1, 0], perm[1, 3] = -1, a.shape[1] - 1   # new axis 0 = old y, reversed (P)
    perm[2, 1], perm[2, 3] = -1, a.shape[2] - 1   # new axis 1 = old z, reversed (I)
    perm[0, 2] = 1                                # new axis 2 = old x (R)
    pa = np.ascontiguousarray(a.transpose(1, 2, 0)[::-1, ::-1])
    ps = np.ascontiguousarray(s.transpose(1, 2, 0)[::-1, ::-1])
    out["pir"] = (_nii(d / "pir.nii.gz", pa, aff @ perm), _nii(d / "pir_seg.nii.gz", ps, aff @ perm))
    assert "".join(nib.aff2axcodes(aff @ perm)) == "PIR" and "".join(nib.aff2axcodes(aff @ flip)) == "LPS"
    return out


def test_orientations_give_same_crops(reoriented, tmp_path):
    rows = [{"case_id": k, "patient_id": "p", "split": "train", "image": im, "mask": m}
            for k, (im, m) in reoriented.items()]
    man = _manifest(tmp_path / "m.csv", rows)
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *SMALL,
                 "--set", "target_spacing_mm=[1.5,1.5,3]"]) == 0
    ds = ShardDataset(tmp_path / "o")
    recs = {k: ds.get(k) for k in reoriented}
    ref = recs["ras"]
    assert sum(ref.present.values()) >= 10
    for k in ("lps", "pir"):
        r = recs[k]
        assert r.meta["source_axcodes"] == k.upper()
        assert r.present == ref.present and r.bbox == ref.bbox
        np.testing.assert_array_equal(r.volume, ref.volume)
        np.testing.assert_array_equal(r.label_map, ref.label_map)
        for a in ref.crops:
            np.testing.assert_array_equal(r.crops[a], ref.crops[a])
            np.testing.assert_array_equal(r.crop_masks[a], ref.crop_masks[a])


def _mean_in(rec, a):
    m = rec.crop_masks[a] > 0
    return float(rec.crops[a][m].mean())


def test_hu_inside_masks_and_dicom_alignment(ct_samples, tmp_path):
    # the CTA aorta mask is binary: relabel it to the TotalSegmentator v2 aorta id (52)
    ao = nib.load(ct_samples / "aorta_report" / "aorta.nii.gz")
    ts = (np.asarray(ao.dataobj) > 0).astype(np.uint8) * 52
    aorta = _nii(tmp_path / "aorta_ts.nii.gz", ts, ao.affine)
    rows = [
        {"case_id": "abd", "image": str(ct_samples / "example_ct_sm.nii.gz"), "mask": str(ct_samples / "example_seg.nii.gz")},
        {"case_id": "cta", "image": str(ct_samples / "aorta_report" / "ct_cropped.nii.gz"), "mask": aorta},
        {"case_id": "dcm", "image": str(ct_samples / "example_ct_dicom"),
         "mask": str(ct_samples / "example_seg_dicom.nii.gz")},
    ]
    man = _manifest(tmp_path / "m.csv", rows)
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *SMALL,
                 "--set", "target_spacing_mm=[1,1,3]", "--set", "crop.shape_all=[128,128,48]"]) == 0
    ds = ShardDataset(tmp_path / "o")
    abd, cta, dcm = ds.get("abd"), ds.get("cta"), ds.get("dcm")
    assert _mean_in(abd, "lung") < -500
    for a in ("liver", "spleen", "kidney"):
        assert -50 < _mean_in(abd, a) < 250, a
    assert _mean_in(cta, "aorta") > 200
    assert not cta.present["heart"] and not cta.present["esophagus"]  # not in the shipped masks
    # DICOM (LPS on read) vs its segmentation stored LAS: aligned only through world coordinates
    assert dcm.meta["source_format"] == "dicom" and dcm.meta["source_axcodes"] == "LPS"
    assert abs(_mean_in(dcm, "liver") - 89) < 10 and abs(_mean_in(dcm, "spleen") - 80) < 10
    assert _mean_in(dcm, "aorta") > 150
    # no identifiers: DICOM header fields never reach the shard
    blob = json.dumps([dcm.meta, dcm.report])
    for word in ("Basel", "Petersgraben", "20221208", "Biograph", str(ct_samples)):
        assert word not in blob
    assert len(dcm.meta["source_sha256"]) == 64 and len(dcm.meta["source_path_sha256"]) == 64


def test_bad_cases_are_reported_and_others_finish(ct_samples, tmp_path):
    good = str(ct_samples / "example_ct_sm.nii.gz")
    seg = str(ct_samples / "example_seg.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes((ct_samples / "example_ct_sm.nii.gz").read_bytes()[:200_000])
    wrong = _nii(tmp_path / "wrong_mask.nii.gz", np.zeros((10, 10, 10), np.uint8), np.eye(4))
    a = nib.load(good)
    raw = _nii(tmp_path / "raw.nii.gz", (np.asarray(a.dataobj).astype(np.int16) + 1024).astype(np.int16), a.affine)
    a2d = _nii(tmp_path / "flat.nii.gz", np.zeros((10, 10), np.int16), np.eye(4))
    nan = np.asarray(a.dataobj).astype(np.float32)
    nan[5, 5, 5] = np.inf
    nanp = _nii(tmp_path / "nan.nii.gz", nan, a.affine)
    rows = [{"case_id": "good", "image": good, "mask": seg},
            {"case_id": "corrupt", "image": str(corrupt), "mask": seg},
            {"case_id": "trunc", "image": str(trunc), "mask": seg},
            {"case_id": "wrongmask", "image": good, "mask": wrong},
            {"case_id": "raw", "image": raw, "mask": seg},
            {"case_id": "raw_fixed", "image": raw, "mask": seg, "rescale_intercept": "-1024", "rescale_slope": "1"},
            {"case_id": "flat", "image": a2d, "mask": seg},
            {"case_id": "nan", "image": nanp, "mask": seg},
            {"case_id": "nomask", "image": good},
            {"case_id": "../../../etc/x", "image": good, "mask": seg}]
    man = _manifest(tmp_path / "m.csv", rows)
    # 7 of 10 failed > max_error_fraction 0.5: exit 3, the 3 good cases still written
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *SMALL]) == 3
    errs = {e["case_id"]: e for e in map(json.loads, (tmp_path / "o" / "errors.jsonl").read_text().splitlines())}
    assert set(errs) == {"corrupt", "trunc", "wrongmask", "raw", "flat", "nan", "nomask"}
    assert errs["corrupt"]["stage"] == "load" and errs["trunc"]["stage"] == "load"
    assert errs["wrongmask"]["stage"] == "mask" and "does not match image shape" in errs["wrongmask"]["reason"]
    assert errs["raw"]["stage"] == "hu" and "raw" in errs["raw"]["reason"]
    assert "3D" in errs["flat"]["reason"] and "NaN/inf" in errs["nan"]["reason"]
    assert "TotalSegmentator weights" in errs["nomask"]["reason"]
    ds = ShardDataset(tmp_path / "o")
    assert sorted(ds.case_ids()) == ["etc_x", "good", "raw_fixed"]
    np.testing.assert_array_equal(ds.get("raw_fixed").volume, ds.get("good").volume)
    assert ds.get("raw_fixed").meta["hu"]["action"] == "applied_metadata_rescale"
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["cases_ok"] == 3 and s["cases_failed"] == 7 and s["failed_by_stage"]["load"] == 3
    assert (tmp_path / "o" / "summary.md").read_text().startswith("# fvlm preprocess summary")
    assert len(list((tmp_path / "o" / "qc").glob("*.png"))) == 3
    assert not (tmp_path.parent / "etc").exists() and (tmp_path / "o" / "config.yaml").exists()


def _ctrate(root, ct_samples):
    a = nib.load(ct_samples / "example_ct_sm.nii.gz")
    hu = np.asarray(a.dataobj).astype(np.int16)
    (root / "dataset" / "train" / "train_1" / "train_1_a").mkdir(parents=True)
    (root / "dataset" / "valid" / "valid_1" / "valid_1_a").mkdir(parents=True)
    # raw values and a blank header: spacing and rescale only in the metadata CSV
    img = nib.Nifti1Image((hu + 1024).astype(np.int16), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, str(root / "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"))
    # already HU, proper header, but the CSV still lists intercept -1024
    nib.save(nib.Nifti1Image(hu, a.affine), str(root / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz"))
    (root / "dataset" / "radiology_text_reports").mkdir()
    (root / "dataset" / "metadata").mkdir()
    for split, name in (("train", "train_1_a_1.nii.gz"), ("validation", "valid_1_a_1.nii.gz")):
        with open(root / f"dataset/radiology_text_reports/{split}_reports.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
            w.writerow([name, "", "", f"Findings of {name}.", "No acute pathology."])
        with open(root / f"dataset/metadata/{split}_metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["VolumeName", "Manufacturer", "RescaleIntercept", "RescaleSlope", "XYSpacing", "ZSpacing"])
            w.writerow([name, "X", "-1024", "1", "[2.0, 2.0]", "3.0"])


def test_ctrate_adapter(ct_samples, tmp_path):
    _ctrate(tmp_path / "ctrate", ct_samples)
    out = tmp_path / "o"
    assert main(["preprocess", "--input", str(tmp_path / "ctrate" / "dataset"), "--out", str(out), *SMALL,
                 "--mask-source", "none"]) == 0
    ds = ShardDataset(out)
    assert ds.case_ids("train") == ["train_1_a_1"] and ds.case_ids("valid") == ["valid_1_a_1"]
    tr, va = ds.get("train_1_a_1"), ds.get("valid_1_a_1")
    assert tr.patient_id == "train_1" and tr.report["findings"] == "Findings of train_1_a_1.nii.gz."
    assert tr.meta["hu"]["action"] == "applied_metadata_rescale"
    assert va.meta["hu"]["action"] == "metadata_rescale_ignored"
    assert tr.meta["source_spacing_mm"] == [2.0, 2.0, 3.0] and "metadata" in tr.meta["spacing_source"]
    assert va.meta["source_spacing_mm"] == [3.0, 3.0, 3.0]
    for r in (tr, va):  # both end in HU: air ~ -1000, not -2048
        assert r.meta["hu"]["air_hu"] < -900 and r.volume.min() >= -1024
        assert np.percentile(r.volume[r.volume > -1024], 5) < -800


def test_parts_and_merge(ct_samples, tmp_path):
    rows = [{"case_id": f"c{i}", "image": str(ct_samples / "example_ct_sm.nii.gz"),
             "mask": str(ct_samples / "example_seg.nii.gz"), "split": "train"} for i in range(3)]
    man = _manifest(tmp_path / "m.csv", rows)
    out = str(tmp_path / "o")
    for i in range(2):
        assert main(["preprocess", "--manifest", man, "--out", out, *SMALL, "--shard-index", str(i),
                     "--num-shards", "2", "--set", "whole.enabled=false"]) == 0
    assert main(["preprocess", "merge", out, "-q"]) == 0
    ds = ShardDataset(out)
    assert ds.case_ids() == ["c0", "c2", "c1"] and ds.whole_shape is None
    assert ds.get("c1").volume is None
    assert main(["preprocess", "--manifest", man, "--out", out, *SMALL, "--set", "whole.shape=[64,64,32]"]) == 2


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_shards(ct_samples, tmp_path):
    rows = [{"case_id": f"c{i}", "patient_id": f"p{i}", "split": "train",
             "image": str(ct_samples / "example_ct_sm.nii.gz"), "mask": str(ct_samples / "example_seg.nii.gz"),
             "findings": f"case {i}"} for i in range(6)]
    man = _manifest(tmp_path / "m.csv", rows)
    cmd = [sys.executable, "-m", "fvlm.cli", "preprocess", "--manifest", man, *SMALL, "--samples-per-shard", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the reference run uses 2 workers: shard bytes must not depend on worker timing either
    subprocess.run(cmd + ["--out", str(full), "--num-workers", "2"], check=True, env=env, timeout=300)
    p = subprocess.Popen(cmd + ["--out", str(killed)], env=env)
    t0 = time.time()
    while time.time() - t0 < 120:  # kill once the first shard is final and more work is staged
        if (killed / "shards" / "000-00000.h5").exists() and list((killed / ".state" / "cases").glob("*.h5")):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "index.jsonl").exists()
    subprocess.run(cmd + ["--out", str(killed)], check=True, env=env, timeout=300)
    names = sorted(x.name for x in (full / "shards").iterdir())
    assert names == sorted(x.name for x in (killed / "shards").iterdir()) and len(names) == 3
    for n in names:
        assert (full / "shards" / n).read_bytes() == (killed / "shards" / n).read_bytes(), n
    assert (full / "index.jsonl").read_text() == (killed / "index.jsonl").read_text()
    s = json.loads((killed / "summary.json").read_text())
    assert s["this_run"]["reused"] >= 2 and s["cases_ok"] == 6


def test_cli_errors(tmp_path, capsys):
    assert main(["preprocess", "--out", str(tmp_path)]) == 2
    assert "--manifest" in capsys.readouterr().err
    assert main(["preprocess", "--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path)]) == 2
    (tmp_path / "dup.csv").write_text("case_id,image\na/b,x.nii\na_b,y.nii\n")
    assert main(["preprocess", "--manifest", str(tmp_path / "dup.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["preprocess", "merge", str(tmp_path)]) == 2
    assert main(["preprocess", "--manifest", str(tmp_path / "dup.csv"), "--out", str(tmp_path / "o"),
                 "--set", "masks.source=magic"]) == 2


def test_totalsegmentator_without_weights(ct_samples, tmp_path, monkeypatch):
    from preprocess.errors import CaseError
    from preprocess.masks import run_totalsegmentator, ts_available

    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts_home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    assert not ts_available()
    with pytest.raises(CaseError, match="totalseg_download_weights"):
        run_totalsegmentator(np.zeros((4, 4, 4), np.int16), np.eye(4), "total", False, "cpu")
    man = _manifest(tmp_path / "m.csv", [{"case_id": "a", "image": str(ct_samples / "example_ct_sm.nii.gz")}])
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *SMALL,
                 "--mask-source", "totalsegmentator"]) == 3  # no case landed
    err = json.loads((tmp_path / "o" / "errors.jsonl").read_text())
    assert err["stage"] == "mask" and "weights are not installed" in err["reason"]


def test_report_labeler_silver_labels(ct_samples, tmp_path):
    pytest.importorskip("preprocess.reports")
    man = _manifest(tmp_path / "m.csv", [{
        "case_id": "a", "image": str(ct_samples / "example_ct_sm.nii.gz"), "mask": str(ct_samples / "example_seg.nii.gz"),
        "findings": "The liver is normal. There is a small gallstone in the gallbladder.",
        "impressions": "Cholelithiasis."}])
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), "--config", "preprocess/small",
                 "-q"]) == 0
    rec = ShardDataset(tmp_path / "o").get("a", volume=False, crops=False)
    assert rec.meta["report_labeler"] == "fvlm54"
    assert rec.labels.get("gallstones") == 1
    assert rec.anatomy_text["gallbladder"]["status"] == "abnormal"
    assert any("gallstone" in t for t in rec.anatomy_text["gallbladder"]["sentences"])


def test_dicom_folder_with_two_series_is_reported(ct_samples, tmp_path):
    import shutil

    import pydicom

    from preprocess.errors import CaseError
    from preprocess.load import load_volume

    d = tmp_path / "two_series"
    d.mkdir()
    for i, f in enumerate(sorted((ct_samples / "example_ct_dicom").iterdir())):
        shutil.copy(f, d / f"a{i:02d}")
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.2.{i}"
        ds.save_as(d / f"b{i:02d}")
    with pytest.raises(CaseError, match="holds 2 DICOM series") as e:
        load_volume(d)
    assert e.value.stage == "input" and "never merged" in e.value.reason
    v = load_volume(d, series_uid="1.2.826.0.1.3680043.8.498.1")
    assert v.array.shape == (512, 512, 20)


def test_mask_dir_and_class_map_check(ct_samples, tmp_path):
    seg = nib.load(ct_samples / "example_seg.nii.gz")
    s = np.asarray(seg.dataobj)
    md = tmp_path / "masks"
    md.mkdir()
    for name, i in (("liver", 5), ("spleen", 1)):
        _nii(md / f"{name}.nii.gz", (s == i).astype(np.uint8), seg.affine)
    bad = tmp_path / "bad_masks"
    bad.mkdir()
    _nii(bad / "livr.nii.gz", (s == 5).astype(np.uint8), seg.affine)
    img = str(ct_samples / "example_ct_sm.nii.gz")
    man = _manifest(tmp_path / "m.csv", [{"case_id": "dir", "image": img, "mask_dir": str(md)},
                                         {"case_id": "baddir", "image": img, "mask_dir": str(bad)}])
    assert main(["preprocess", "--manifest", man, "--out", str(tmp_path / "o"), *SMALL]) == 0
    r = ShardDataset(tmp_path / "o").get("dir", volume=False)
    assert [a for a, p in r.present.items() if p] == ["liver", "spleen"]
    err = json.loads((tmp_path / "o" / "errors.jsonl").read_text())
    assert err["case_id"] == "baddir" and "livr.nii.gz" in err["reason"]
    # v2 labels (up to 117) declared as v1 (104 classes): caught, with the fix named
    man2 = _manifest(tmp_path / "m2.csv", [{"case_id": "v1", "image": img, "mask": str(ct_samples / "example_seg.nii.gz")}])
    assert main(["preprocess", "--manifest", man2, "--out", str(tmp_path / "o2"), *SMALL,
                 "--set", "masks.class_map=v1"]) == 3  # no case landed
    err = json.loads((tmp_path / "o2" / "errors.jsonl").read_text())
    assert err["stage"] == "mask" and "masks.class_map=v2" in err["reason"]
