"""Shard layout v2 on the shipped CT: every crop read from the shards equals the crop cut from the
full resampled volume in memory, voxel for voxel, and nothing is stored twice."""
import csv

import numpy as np

from fvlm.cli import main
from fvlm.data import ShardDataset
from fvlm.data.shards import open_h5
from preprocess.crop import center_fit, crop_anatomy


def test_crops_equal_the_full_volume_cut(ct_samples, tmp_path):
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image", "mask", "split"])
        w.writerow(["ct", ct_samples / "example_ct_sm.nii.gz", ct_samples / "example_seg.nii.gz", "train"])
    out = tmp_path / "o"
    # small chunks, so crops cross chunk borders; 3 mm crops, some of them resized (scale > 1)
    assert main(["preprocess", "--manifest", str(man), "--out", str(out), "--config", "preprocess/small", "-q",
                 "--set", "reports.labeler=false", "--set", "shards.chunk_shape=[16,16,8]"]) == 0
    ds = ShardDataset(out)
    L = ds.layout
    with open_h5(out / ds.index_row("ct")["shard"]) as f:
        assert sorted(f) == sorted(["anatomy_text", "bbox", "case_id", "label_map", "labels", "meta", "patient_id",
                                    "present", "report", "shape", "spacing_mm", "split", "volume"])
        vol, lab = f["volume/0"][()], f["label_map/0"][()]
        stored_box = {a: tuple(int(v) for v in f["bbox"][0][j]) for j, a in enumerate(L.anatomies)}
    rec = ds.get("ct")
    present = [a for a in L.anatomies if rec.present[a]]
    assert len(present) >= 5
    scales = set()
    for a in present:
        img, msk, info = crop_anatomy(vol, lab, L.anatomies.index(a) + 1, stored_box[a], L.spacing_mm,
                                      L.crop_shapes[a], L.margin(a), L.crop_oversize)
        np.testing.assert_array_equal(rec.crops[a], img)
        np.testing.assert_array_equal(rec.crop_masks[a], msk)
        one, one_m, ok = ds.crop("ct", a)
        assert ok
        np.testing.assert_array_equal(one, img)
        np.testing.assert_array_equal(one_m, msk)
        assert info == {k: rec.meta["crop"][a][k] for k in info}
        scales.add(info["scale"] > 1)
    assert scales == {True, False}
    np.testing.assert_array_equal(rec.volume, center_fit(vol, L.whole_shape, -1024)[0])
    np.testing.assert_array_equal(rec.label_map, center_fit(lab, L.whole_shape, 0)[0])
