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


def test_crops_resized_on_read_equal_the_resized_full_crop(ct_samples, tmp_path):
    """``get(crop_size=...)`` samples the stored volume where a trilinear resize of the full crop
    would: for native crops inside the scan the two agree (float rounding only), masks exactly."""
    import torch
    import torch.nn.functional as F

    man = tmp_path / "m.csv"
    man.write_text(f"case_id,image,mask,split\nct,{ct_samples / 'example_ct.nii.gz'},"
                   f"{ct_samples / 'example_seg_fast_force_split.nii.gz'},train\n")
    out = tmp_path / "o"
    assert main(["preprocess", "--manifest", str(man), "--out", str(out), "--config", "preprocess/small", "-q",
                 "--set", "reports.labeler=false"]) == 0
    ds = ShardDataset(out)
    full = ds.get("ct", volume=False)
    size = (20, 16, 12)
    small = ds.get("ct", volume=False, crop_size=size)
    checked = 0
    for a, info in full.meta["crop"].items():
        inside = all(o >= 0 for o in info["origin_vox"]) and all(
            o + n <= s for o, n, s in zip(info["origin_vox"], ds.layout.crop_shapes[a], full.meta["resampled_shape"]))
        assert small.crops[a].shape == size and small.crop_masks[a].shape == size
        if info["scale"] != 1 or not inside:
            continue
        ref = F.interpolate(torch.from_numpy(full.crops[a].astype(np.float32))[None, None], size=size,
                            mode="trilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(small.crops[a], ref, atol=0.05)
        m = F.interpolate(torch.from_numpy(full.crop_masks[a])[None, None].float(), size=size,
                          mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        np.testing.assert_array_equal(small.crop_masks[a], m)
        checked += 1
    assert checked >= 1
